"""STS Benchmark test: how well an encoder's sentence embeddings rank sentence pairs by similarity.

The protocol of sentence-transformers and MTEB's STSBenchmark: embed each sentence by attention-mask
weighted mean pooling of the last hidden states, score each pair by cosine similarity, and report the
Spearman rank correlation (and Pearson) between those scores and the gold similarity (0-5) over the
1379 test pairs. Correlations are reported as fractions in [-1, 1] (MTEB multiplies by 100).
all-MiniLM-L6-v2 scores about 0.82 Spearman.

The file is the original ``sts-test.tsv`` (no header; genre, file, year, id, score, sentence1,
sentence2; some rows carry extra trailing columns, which are ignored). Quotes are literal text, so the
file is read with ``csv.QUOTE_NONE``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from rankwise.errors import DataError, first_line
from rankwise.evaluation.embeddings import encode_sentences, encoder_max_length
from rankwise.evaluation.progress import task_progress
from rankwise.evaluation.registry import EvalOptions, Task, register_task
from rankwise.evaluation.results import TaskResult

DATA_FILE = "stsb/sts-test.tsv"


def read_pairs(path: Path) -> list[tuple[str, str, float]]:
    """(sentence1, sentence2, gold score) for every row; a short or non-numeric row is a one-line DataError."""
    pairs = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for lineno, cols in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not cols:
                    continue
                if len(cols) < 7:
                    raise DataError(f"{path}:{lineno}: expected at least 7 tab-separated columns, got {len(cols)}")
                try:
                    score = float(cols[4])
                except ValueError:
                    raise DataError(f"{path}:{lineno}: score column is not a number: {cols[4]!r}") from None
                pairs.append((cols[5], cols[6], score))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable ({first_line(exc)})") from None
    if not pairs:
        raise DataError(f"{path} holds no sentence pairs")
    return pairs


def correlation_stderr(r: float, n: int, spearman: bool) -> float | None:
    """Approximate standard error of a correlation via Fisher's z and the delta method.

    Var(z) = 1/(n-3) for Pearson and (1 + r^2/2)/(n-3) for Spearman (Bonett & Wright, 2000); then
    SE(r) = (1 - r^2) * sqrt(Var(z)).
    """
    if n <= 3 or not math.isfinite(r):
        return None
    var_z = (1 + r * r / 2 if spearman else 1.0) / (n - 3)
    return (1 - r * r) * math.sqrt(var_z)


@register_task
class STSB(Task):
    name = "stsb"
    kind = "embedding"
    requires = "encoder"
    description = "STS Benchmark test: Spearman/Pearson of mean-pooled cosine similarity vs gold (encoders)"
    files = (DATA_FILE,)

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        pairs = read_pairs(self.data_path(options, DATA_FILE))
        subset = self.subset(len(pairs), options)
        chosen = [pairs[i] for i in subset.indices]
        sentences = sorted({s for a, b, _ in chosen for s in (a, b)})
        row = {s: i for i, s in enumerate(sentences)}
        max_length = options.seq_len or encoder_max_length(model, tokenizer)
        with task_progress(self.name, len(sentences), options.progress) as advance:
            emb = encode_sentences(model, tokenizer, sentences, batch_size=options.batch_size,
                                   max_length=max_length, progress=advance)
        left = emb[torch.tensor([row[a] for a, _, _ in chosen])]
        right = emb[torch.tensor([row[b] for _, b, _ in chosen])]
        cosine = torch.nn.functional.cosine_similarity(left.double(), right.double(), dim=-1).tolist()
        gold = [g for _, _, g in chosen]
        n = len(chosen)
        if n < 3:
            raise DataError(f"stsb needs at least 3 pairs for a correlation, got {n}")
        spearman = float(stats.spearmanr(cosine, gold).statistic)
        pearson = float(stats.pearsonr(cosine, gold).statistic)
        samples = [{"doc_id": i, "cosine": c, "gold": g} for i, c, g in zip(subset.indices, cosine, gold, strict=True)]
        return TaskResult(
            task=self.name,
            metrics={"spearman": spearman, "pearson": pearson},
            stderr={"spearman": correlation_stderr(spearman, n, spearman=True),
                    "pearson": correlation_stderr(pearson, n, spearman=False)},
            n=n,
            protocol={
                "source": f"STS Benchmark test, {len(pairs)} pairs ({DATA_FILE}), gold scores 0-5",
                "subset": subset.description,
                "embedding": "attention-mask weighted mean of the last hidden states (sentence-transformers)",
                "similarity": "cosine",
                "max_length": max_length,
                "metrics": {
                    "spearman": "Spearman rank correlation of cosine similarity with the gold score (fraction)",
                    "pearson": "Pearson correlation of cosine similarity with the gold score (fraction)",
                },
                "stderr": "Fisher z delta method (Spearman: Bonett-Wright variance (1 + r^2/2)/(n-3))",
            },
            samples=samples,
        )

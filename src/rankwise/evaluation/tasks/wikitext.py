"""WikiText-2 (raw) test perplexity, in the two protocols people report, as two tasks.

``wikitext_token`` is the compression papers' number (GPTQ, SVD-LLM, ASVD): the 4358 test rows as the
Hugging Face ``wikitext-2-raw-v1`` dataset holds them (each line of ``wiki.test.raw`` with its newline;
blank lines, which are ``" "`` in the file, as ``""``), joined with ``"\\n\\n"``, tokenized once, cut into
non-overlapping ``seq_len``-token windows (default 2048; the last partial window is dropped, as GPTQ
does); perplexity = exp(mean NLL over the ``seq_len - 1`` predicted tokens of every window). ``--limit N``
scores the first N windows.

``wikitext`` is lm-eval 0.4.13's task of that name: the test file split into the 62 documents of
``EleutherAI/wikitext_document_level`` (a new document at each top-level heading line `` = Title = ``,
exactly as that dataset's builder splits the raw file), each detokenized with lm-eval's
``wikitext_detokenizer`` and scored whole with rolling windows of the model's maximum length
(``loglikelihood_rolling``). It reports word perplexity, byte perplexity and bits per byte, where words
and bytes are counted on the document *before* detokenization, as lm-eval does. ``--limit N`` scores the
first N documents. The numbers are not comparable with ``wikitext_token``'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from rankwise.errors import DataError, RankwiseError, first_line
from rankwise.evaluation.engine import PairEncoder
from rankwise.evaluation.perplexity import (
    encode,
    max_model_length,
    prefix_token_id,
    rolling_windows,
    score_windows,
    token_perplexity,
    token_windows,
)
from rankwise.evaluation.progress import task_progress
from rankwise.evaluation.registry import EvalOptions, Task, register_task
from rankwise.evaluation.results import TaskResult

DATA_FILE = "wikitext-2-raw/wiki.test.raw"
DEFAULT_SEQ_LEN = 2048
TOKEN_BUDGET = 4096  # padded tokens per forward pass; the logits of a pass take budget x vocab x 4 bytes


def read_raw(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({first_line(exc)})") from None


def dataset_rows(raw: str) -> list[str]:
    """The rows of HF ``wikitext-2-raw-v1``: each line keeps its ``"\\n"``; whitespace-only lines become ``""``."""
    lines = raw.split("\n")  # only "\n" (as iterating the file does), not str.splitlines' other breaks
    rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return [row if row.strip() else "" for row in rows]


def split_documents(raw: str) -> list[str]:
    """The pages of ``EleutherAI/wikitext_document_level``: a new page at every top-level heading line.

    A heading is a line that, with ``"= = ="``/``"= ="`` collapsed and stripped, starts with ``"= "`` and
    ends with ``" ="`` (sub-headings ``" = = Career = = "`` become ``"== Career =="`` and do not count).
    Pages are the lines joined by ``"\\n"``; text before the first heading is kept only if not blank.
    """
    pages: list[str] = []
    current: list[str] = []
    for line in raw.split("\n"):
        collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
        if collapsed.startswith("= ") and collapsed.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def detokenize(page: str) -> str:
    """lm-eval's ``wikitext_detokenizer``: undo WikiText's spaced punctuation and ``@-@`` number separators."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for mark in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {mark} ", f"{mark} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def count_words(page: str) -> int:
    """lm-eval's word count: ``len(re.split(r"\\s+", page))`` on the original page (empty edges count)."""
    return len(re.split(r"\s+", page))


def count_bytes(page: str) -> int:
    return len(page.encode("utf-8"))


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Standard error of sum(a)/sum(b) over independent units (delta method for a ratio estimator)."""
    n = len(numerators)
    if n < 2:
        return None
    ratio = sum(numerators) / sum(denominators)
    mean_b = sum(denominators) / n
    resid = [a - ratio * b for a, b in zip(numerators, denominators, strict=True)]
    var = sum(r * r for r in resid) / (n - 1)
    return math.sqrt(var / n) / mean_b


class WikitextTask(Task):
    """A perplexity task on the WikiText-2 raw test file: checks the window length, reads the file once and
    leaves the splitting and scoring to :meth:`score`."""

    kind = "perplexity"
    files = (DATA_FILE,)
    #: The shortest window (``--seq-len``) the protocol can score.
    min_length: ClassVar[int] = 1

    def default_length(self, model: Any, tokenizer: Any) -> int:
        """The window length without ``--seq-len``."""
        raise NotImplementedError  # pragma: no cover

    def score(self, model: Any, tokenizer: Any, raw: str, length: int, options: EvalOptions) -> TaskResult:
        raise NotImplementedError  # pragma: no cover

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        length = options.seq_len or self.default_length(model, tokenizer)
        if length < self.min_length:
            unit = "token" if self.min_length == 1 else "tokens"
            raise RankwiseError(f"{self.name} needs --seq-len of at least {self.min_length} {unit}, got {length}")
        path = self.data_path(options, DATA_FILE)
        return self.score(model, tokenizer, options.derive(("wikitext", "raw", path), lambda: read_raw(path)),
                          length, options)


@register_task
class WikitextToken(WikitextTask):
    name = "wikitext_token"
    description = "WikiText-2 raw test, token-level perplexity in non-overlapping seq-len windows (GPTQ/SVD-LLM)"
    min_length = 2

    def default_length(self, model: Any, tokenizer: Any) -> int:
        return DEFAULT_SEQ_LEN

    def score(self, model: Any, tokenizer: Any, raw: str, seq_len: int, options: EvalOptions) -> TaskResult:
        # the whole split's token ids (0.8 s on one core): once per study worker, not once per trial
        ids = options.derive((self.name, "ids", hash(raw)), lambda: encode(tokenizer, "\n\n".join(dataset_rows(raw))))
        windows = token_windows(ids, seq_len)
        if not windows:
            raise DataError(f"{DATA_FILE} has {len(ids)} tokens, fewer than one window of {seq_len}")
        subset = self.subset(len(windows), options)
        chosen = [windows[i] for i in subset.indices]
        with task_progress(self.name, len(chosen), options.progress) as advance:
            logprobs = score_windows(model, chosen, batch_size=options.batch_size,
                                     token_budget=max(seq_len, TOKEN_BUDGET), progress=advance)
        ppl = token_perplexity(logprobs)
        per_window = [float(-lp.double().mean()) for lp in logprobs]
        nll_err = None if ppl.ppl_stderr is None else ppl.ppl_stderr / ppl.ppl
        samples = [{"window": i, "mean_nll": nll} for i, nll in zip(subset.indices, per_window, strict=True)]
        return TaskResult(
            task=self.name,
            metrics={"token_perplexity": ppl.ppl, "nll_per_token": ppl.mean_nll},
            stderr={"token_perplexity": ppl.ppl_stderr, "nll_per_token": nll_err},
            n=ppl.n_windows,
            protocol={
                "source": f"WikiText-2 raw test ({DATA_FILE}), the 4358 HF dataset rows joined by '\\n\\n'",
                "protocol": "token-level (GPTQ/SVD-LLM): non-overlapping windows, each scored without "
                            "context from the previous one; the last partial window dropped",
                "seq_len": seq_len,
                "tokens_total": len(ids),
                "windows_total": len(windows),
                "tokens_dropped": len(ids) - len(windows) * seq_len,
                "subset": f"windows: {subset.description}",
                "predicted_tokens": ppl.n_tokens,
                "metrics": {
                    "token_perplexity": "exp(mean NLL over every predicted token, seq_len - 1 per window)",
                    "nll_per_token": "mean negative log-likelihood per predicted token, nats",
                },
                "stderr": "over windows: std of per-window mean NLL / sqrt(windows); perplexity by the delta method",
            },
            samples=samples,
        )


@register_task
class Wikitext(WikitextTask):
    name = "wikitext"
    description = "WikiText-2 raw test as lm-eval's wikitext: rolling log-likelihood of 62 documents, word/byte ppl"

    def default_length(self, model: Any, tokenizer: Any) -> int:
        return max_model_length(model, tokenizer)

    def score(self, model: Any, tokenizer: Any, raw: str, max_len: int, options: EvalOptions) -> TaskResult:
        pages = split_documents(raw)
        subset = self.subset(len(pages), options)
        encoder = PairEncoder(tokenizer)
        prefix = prefix_token_id(tokenizer)
        windows, owner = [], []
        for doc, i in enumerate(subset.indices):
            for win in rolling_windows(encoder.encode(detokenize(pages[i])), prefix, max_len):
                windows.append(win)
                owner.append(doc)
        with task_progress(self.name, len(windows), options.progress) as advance:
            logprobs = score_windows(model, windows, batch_size=options.batch_size,
                                     token_budget=max(max_len, TOKEN_BUDGET), progress=advance)
        lls = [0.0] * len(subset.indices)
        n_tokens = [0] * len(subset.indices)
        for doc, lp in zip(owner, logprobs, strict=True):
            lls[doc] += float(lp.double().sum())
            n_tokens[doc] += int(lp.numel())
        words = [count_words(pages[i]) for i in subset.indices]
        nbytes = [count_bytes(pages[i]) for i in subset.indices]
        nll = [-x for x in lls]
        per_word, per_byte = sum(nll) / sum(words), sum(nll) / sum(nbytes)
        word_err, byte_err = ratio_stderr(nll, words), ratio_stderr(nll, nbytes)
        metrics = {
            "word_perplexity": math.exp(per_word),
            "byte_perplexity": math.exp(per_byte),
            "bits_per_byte": per_byte / math.log(2),
        }
        stderr = {
            "word_perplexity": None if word_err is None else metrics["word_perplexity"] * word_err,
            "byte_perplexity": None if byte_err is None else metrics["byte_perplexity"] * byte_err,
            "bits_per_byte": None if byte_err is None else byte_err / math.log(2),
        }
        samples = [{"doc_id": i, "loglikelihood": ll, "tokens": t, "words": w, "bytes": b}
                   for i, ll, t, w, b in zip(subset.indices, lls, n_tokens, words, nbytes, strict=True)]
        return TaskResult(
            task=self.name,
            metrics=metrics,
            stderr=stderr,
            n=len(subset.indices),
            protocol={
                "source": f"WikiText-2 raw test ({DATA_FILE}) split into the {len(pages)} documents of "
                          "EleutherAI/wikitext_document_level",
                "prompt": "lm-eval 0.4.13 wikitext v2.0: loglikelihood_rolling of wikitext_detokenizer(page)",
                "protocol": "rolling windows (lm-eval get_rolling_token_windows + make_disjoint_window, "
                            "context_len=1): every token predicted once, first token after the BOS/EOS prefix",
                "max_length": max_len,
                "subset": f"documents: {subset.description}",
                "tokens": sum(n_tokens),
                "words": sum(words),
                "bytes": sum(nbytes),
                "metrics": {
                    "word_perplexity": "exp(-sum loglikelihood / sum words), words of the page before "
                                       "detokenization (lm-eval)",
                    "byte_perplexity": "exp(-sum loglikelihood / sum UTF-8 bytes of the page)",
                    "bits_per_byte": "-sum loglikelihood / sum bytes / ln 2",
                },
                "stderr": "over documents: ratio-estimator delta method (lm-eval reports none for these)",
            },
            samples=samples,
        )

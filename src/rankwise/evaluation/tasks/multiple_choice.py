"""Generic multiple-choice evaluation: documents -> (context, choices, gold) -> acc, acc_norm with stderr.

A multiple-choice task only says how to turn its file into :class:`MCDoc` records (prompt text, choices,
gold index), following lm-eval 0.4.13's task of the same name. Everything else is shared: one
log-likelihood request per choice (``context`` + target delimiter + ``choice``), scored by
:mod:`rankwise.evaluation.engine`, then lm-eval's metrics:

* ``acc``: the choice with the highest summed log-likelihood is the gold one;
* ``acc_norm``: the same after dividing each log-likelihood by the choice's length in characters;

each reported as a mean over the documents with the standard error of the mean, ``n`` and a protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rankwise.errors import RankwiseError
from rankwise.evaluation import engine
from rankwise.evaluation.progress import task_progress
from rankwise.evaluation.registry import EvalOptions, Task
from rankwise.evaluation.results import TaskResult, mean_stderr
from rankwise.evaluation.sampling import Subset

#: What each metric means; copied into every result's protocol so numbers are never unlabelled.
METRIC_DEFINITIONS: dict[str, str] = {
    "acc": "accuracy: argmax over choices of the summed continuation log-likelihood is the gold choice",
    "acc_norm": "accuracy with each choice's log-likelihood divided by its length in characters (lm-eval acc_norm)",
    "mc2": "normalized probability mass on the true answers: sum of exp(ll) over true / over all choices",
    "perplexity": "exp of minus the mean log-likelihood of the target (lm-eval 'perplexity' aggregation)",
    "greedy_acc": "the target is the greedy (argmax) continuation, token by token",
}

ENGINE_NOTE = (
    "log-likelihoods as lm-eval 0.4.13 HFLM (encode whole, split after the context's tokens; left "
    "truncation), computed by the strategy named in 'strategy'; log-softmax in float32"
)


@dataclass
class MCDoc:
    """One question: the prompt, the choices (without the delimiter), the gold index, the true labels."""

    doc_id: int  # position in the task's full evaluation split
    context: str
    choices: list[str]
    gold: int
    labels: list[int] | None = None  # 0/1 per choice where several answers are true (TruthfulQA MC2)
    delimiter: str = " "
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredDoc:
    doc: MCDoc
    lls: list[float]
    greedy: list[bool]


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum, as ``numpy.argmax`` (ties go to the earlier choice, like lm-eval)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def requests_for(docs: Sequence[MCDoc]) -> list[tuple[str, str]]:
    """lm-eval's requests: (context, delimiter + choice) for every choice of every document."""
    return [(d.context, d.delimiter + c) for d in docs for c in d.choices]


def scoring_strategy(model: Any, tokenizer: Any, options: EvalOptions) -> engine.Strategy:
    """The engine strategy this model is scored with under ``options.strategy`` (decided once per model)."""
    return engine.resolve_strategy(model, options.strategy, engine.pad_token_id(tokenizer))


def strategy_protocol(strategy: engine.Strategy) -> dict[str, str]:
    """The protocol entries that say how the log-likelihoods were computed."""
    return {"strategy": strategy.name, "strategy_reason": strategy.reason}


def score_requests(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], options: EvalOptions,
                   description: str) -> tuple[list[engine.LoglikelihoodResult], engine.Strategy]:
    """Score (context, continuation) requests with a progress line that names the strategy (and, when it
    is not ``packed``, why); returns the results and the strategy for the task's protocol."""
    strategy = scoring_strategy(model, tokenizer, options)
    label = f"{description} [{strategy.name}]"
    if options.progress and strategy.name != "packed":
        from rich.console import Console

        Console(stderr=True).print(f"{description}: scoring strategy {strategy.name} ({strategy.reason})",
                                   markup=False, highlight=False)
    with task_progress(label, len(requests), options.progress) as advance:
        results = engine.loglikelihood(
            model, tokenizer, requests, batch_size=options.batch_size,
            max_length=options.seq_len, strategy=strategy.name, progress=advance,
        )
    return results, strategy


def score_docs(model: Any, tokenizer: Any, docs: Sequence[MCDoc], options: EvalOptions,
               description: str) -> list[ScoredDoc]:
    """Log-likelihood of every choice of every document, in one batched engine call (with progress)."""
    results, _ = score_requests(model, tokenizer, requests_for(docs), options, description)
    scored: list[ScoredDoc] = []
    pos = 0
    for d in docs:
        chunk = results[pos: pos + len(d.choices)]
        pos += len(d.choices)
        scored.append(ScoredDoc(d, [r.logprob for r in chunk], [r.is_greedy for r in chunk]))
    return scored


def acc_metrics(s: ScoredDoc) -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` for one document."""
    pred = argmax(s.lls)
    lengths = [float(len(c)) for c in s.doc.choices]
    normed = [ll / n if n else -math.inf for ll, n in zip(s.lls, lengths, strict=True)]
    pred_norm = argmax(normed)
    return {"acc": float(pred == s.doc.gold), "acc_norm": float(pred_norm == s.doc.gold)}


def mc2_metric(s: ScoredDoc) -> dict[str, float]:
    """TruthfulQA MC2: probability mass of the true answers after normalising over all answers."""
    if s.doc.labels is None:
        raise ValueError("mc2 needs per-choice labels")
    top = max(s.lls)
    probs = [math.exp(ll - top) for ll in s.lls]  # shifted for stability; the ratio is unchanged
    total = sum(probs)
    return {"acc": sum(p for p, lab in zip(probs, s.doc.labels, strict=True) if lab == 1) / total}


def sample_record(s: ScoredDoc, metrics: dict[str, float], with_context: bool) -> dict[str, Any]:
    """What ``--log-samples`` writes for one document: inputs, per-choice log-likelihoods, predictions."""
    lengths = [float(len(c)) for c in s.doc.choices]
    rec: dict[str, Any] = {
        "doc_id": s.doc.doc_id,
        **s.doc.meta,
        "gold": s.doc.gold,
        "choices": s.doc.choices,
        "loglikelihoods": s.lls,
        "is_greedy": s.greedy,
        "pred": argmax(s.lls),
        "pred_norm": argmax([ll / n if n else -math.inf for ll, n in zip(s.lls, lengths, strict=True)]),
        **metrics,
    }
    if s.doc.labels is not None:
        rec["labels"] = s.doc.labels
    if with_context:
        rec["context"] = s.doc.context
    return rec


def summarize(name: str, per_doc: Sequence[dict[str, float]], metric_names: Sequence[str],
              protocol: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> TaskResult:
    """Mean and standard error of each metric over the documents."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for m in metric_names:
        metrics[m], stderr[m] = mean_stderr([d[m] for d in per_doc])
    return TaskResult(task=name, metrics=metrics, stderr=stderr, n=len(per_doc), protocol=protocol,
                      samples=samples or [])


class MultipleChoiceTask(Task):
    """Base of the multiple-choice tasks: subclasses implement :meth:`load_docs` and set the class info."""

    kind = "loglikelihood"
    requires = "causal-lm"
    metric_names: ClassVar[tuple[str, ...]] = ("acc", "acc_norm")
    #: lm-eval task name and version the prompt follows, e.g. ``"lm-eval 0.4.13 arc_easy v1.0"``.
    prompt_version: ClassVar[str] = ""
    #: Which data: file and split, e.g. ``"ARC-Easy test (arc-easy/ARC-Easy-Test.jsonl)"``.
    source: ClassVar[str] = ""
    default_shots: ClassVar[int] = 0
    max_shots: ClassVar[int] = 0
    shots_note: ClassVar[str] = ""
    metric_notes: ClassVar[dict[str, str]] = {}

    def load_docs(self, options: EvalOptions, shots: int) -> list[MCDoc]:  # pragma: no cover
        raise NotImplementedError

    def doc_metrics(self, s: ScoredDoc) -> dict[str, float]:
        return acc_metrics(s)

    def resolve_shots(self, options: EvalOptions) -> int:
        shots = self.default_shots if options.shots is None else options.shots
        if shots < 0 or shots > self.max_shots:
            allowed = "0" if self.max_shots == 0 else f"0 to {self.max_shots}"
            raise RankwiseError(f"task {self.name} supports {allowed} shots here, not {shots}")
        return shots

    def protocol(self, shots: int, subset: Subset, strategy: engine.Strategy | None = None) -> dict[str, Any]:
        return {
            "shots": shots if not self.shots_note else f"{shots} ({self.shots_note})",
            "subset": subset.description,
            "source": self.source,
            "prompt": self.prompt_version,
            "metrics": {m: self.metric_notes.get(m, METRIC_DEFINITIONS[m]) for m in self.metric_names},
            "scoring": ENGINE_NOTE,
            **(strategy_protocol(strategy) if strategy is not None else {}),
        }

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        shots = self.resolve_shots(options)
        docs = options.derive((self.name, "docs", shots, options.data_dir, options.seed, options.pooled),
                              lambda: self.load_docs(options, shots))
        subset = self.subset(len(docs), options)
        chosen = [docs[i] for i in subset.indices]
        scored = score_docs(model, tokenizer, chosen, options, self.name)
        per_doc = [self.doc_metrics(s) for s in scored]
        samples = [sample_record(s, m, options.log_samples) for s, m in zip(scored, per_doc, strict=True)]
        protocol = self.protocol(shots, subset, scoring_strategy(model, tokenizer, options))
        return summarize(self.name, per_doc, self.metric_names, protocol, samples)



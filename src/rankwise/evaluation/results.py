"""What an evaluation returns: metrics with standard errors, the item count, and the protocol used.

Every number rankwise prints is labelled with how it was measured, so a :class:`TaskResult` always carries
``n`` and a ``protocol`` dict (shots, subset, prompt version, metric definitions) next to its metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """One task's scores. ``metrics`` and ``stderr`` share keys (e.g. ``acc``, ``acc_norm``, ``ppl``)."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    n: int
    protocol: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)
    seconds: float | None = None
    #: Per-part results of a group task (e.g. MMLU's subjects and categories); empty for a plain task.
    subtasks: list[TaskResult] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_samples:
            _drop_samples(out)
        return out


def _drop_samples(d: dict[str, Any]) -> None:
    d.pop("samples", None)
    for sub in d.get("subtasks") or []:
        _drop_samples(sub)


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)), as lm-eval reports for ``acc``."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """Standard error of a size-weighted mean of subtask means, pooled as lm-eval aggregates groups.

    Same formula as lm-eval's ``pooled_sample_stderr`` (pooled sample variance over the subtasks), so a
    group's stderr (e.g. MMLU's) matches lm-eval's report.
    """
    if len(stderrs) != len(sizes) or sum(sizes) - len(sizes) <= 0:
        return None
    if any(se is None for se in stderrs):
        return None
    terms = [(n - 1) * float(se) ** 2 * n for n, se in zip(sizes, stderrs, strict=True)]  # type: ignore[arg-type]
    pooled_var = sum(terms) / (sum(sizes) - len(sizes))
    return math.sqrt(pooled_var / sum(sizes))

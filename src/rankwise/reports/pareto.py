"""Pareto fronts of study trials over any objectives, and the objectives a report can plot.

A trial is on the front when no other trial is at least as good on every objective and strictly better
on one. Computed directly (all pairs): studies have hundreds of trials, not millions, and the direct test
is the definition, so there is nothing to get subtly wrong about ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rankwise.errors import RankwiseError


@dataclass(frozen=True)
class Objective:
    """One axis of a trade-off: how to read it from a trial, which way is better, and how to label it."""

    key: str  # document key: a trial field, "metric:NAME" or "efficiency.FIELD"
    label: str  # axis label, with its unit
    maximize: bool
    scale: float = 1.0  # display scale (fractions shown as percent)
    short: str = ""  # name in titles

    def __post_init__(self) -> None:
        if not self.short:
            object.__setattr__(self, "short", self.label.split(" (")[0].split(" vs ")[0])


#: Objectives every study document has or may have (benchmarks add ``metric:NAME``).
OBJECTIVES: dict[str, Objective] = {
    "size_reduction": Objective("size_reduction", "model size reduction vs dense (% of parameters)", True, 100.0),
    "params_ratio": Objective("params_ratio", "parameters kept (% of dense)", False, 100.0),
    "params": Objective("params", "parameters (millions)", False, 1e-6),
    "bytes": Objective("bytes", "weight bytes (MB)", False, 1e-6),
    "mean_accuracy": Objective("mean_accuracy", "mean accuracy over accuracy benchmarks (%)", True, 100.0,
                               "mean accuracy"),
    "latency_change": Objective("efficiency.latency_change", "decode latency change vs dense (%)", False, 100.0),
    "energy_change": Objective("efficiency.energy_change", "energy change vs dense (%)", False, 100.0),
    "decode_ms": Objective("efficiency.decode_ms", "decode latency (ms/token)", False, 1.0),
}


def objective(name: str, metric_kind: dict[str, tuple[str, bool]] | None = None) -> Objective:
    """An objective by name: a key of :data:`OBJECTIVES`, or a benchmark (``arc_easy`` / ``metric:arc_easy``).

    ``metric_kind`` maps benchmark -> (metric name, lower_is_better) so the axis says which metric it is.
    """
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    bench = name.removeprefix("metric:")
    if metric_kind and bench in metric_kind:
        metric_name, lower = metric_kind[bench]
        if lower:
            return Objective(f"metric:{bench}", f"{bench} {metric_name} (lower is better)", False, 1.0)
        return Objective(f"metric:{bench}", f"{bench} {metric_name} (%)", True, 100.0)
    known = ", ".join([*OBJECTIVES, *(metric_kind or {})])
    raise RankwiseError(f"unknown objective {name!r}: choose one of {known}")


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    better = False
    for x, y, up in zip(a, b, maximize, strict=True):
        if (x < y) if up else (x > y):
            return False
        if x != y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all on the front)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, maximize) for j, q in enumerate(points) if j != i)]

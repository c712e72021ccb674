"""Rank allocators: given a cap on the targets' kept parameters, choose every target's rank (or dense).

Allocators register by name (as decomposition methods do) and share one interface, so ``rankwise allocate
--allocator NAME`` and studies can swap them:

* ``uniform`` - the same kept fraction f of every matrix's parameters, f the largest that meets the cap;
* ``energy`` - data-free (WeLore-like): every matrix keeps the smallest rank holding a fraction τ of its
  squared singular values, τ shared by all matrices and the largest that meets the cap, so matrices with
  a heavy-tailed spectrum get low ranks and flat ones high ranks;
* ``greedy`` - from the smallest rank everywhere, repeatedly take the upgrade (next rank on the grid, or
  dense) with the best predicted-loss reduction per parameter that still fits;
* ``knapsack`` - exact multiple-choice knapsack by dynamic programming: minimizes the summed predicted
  loss over per-target choices (a grid of ranks, or dense) under the cap. Costs are counted in units of
  ``u`` parameters, rounded *up*, so the DP's optimum can never exceed the cap (u = 1 is exact; the default
  u keeps the table under ``max_units`` cells per target);
* ``target`` - ASVD's mode: the smallest model whose predicted loss stays under ``max_loss``, found by
  binary search over the knapsack's optimal loss-vs-size curve (which the DP computes for every size
  at once), within the cap.

Every allocator returns choices whose parameters sum to ``<= cap``: budgets are never exceeded.
``greedy``, ``knapsack`` and ``target`` need a sensitivity profile (predicted loss per target and rank);
``energy`` needs each matrix's spectrum; ``uniform`` needs only shapes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rankwise.allocation.budget import Target, TargetSize
from rankwise.design.ranks import fraction_rank
from rankwise.errors import PlanError

Choice = int | None  # a rank, or None = keep dense
Predictor = Callable[[Target, Choice], float]


@dataclass
class Problem:
    """What an allocator sees: the targets, the cap, and (for some allocators) spectra or predicted losses."""

    targets: Sequence[TargetSize]
    cap: int  # most parameters the targets may keep in total
    spectra: Mapping[Target, Sequence[float]] | None = None  # singular values per target (energy)
    predict: Predictor | None = None  # predicted proxy loss of a target at a rank (dense: 0)
    grid: int = 32  # rank levels per target for greedy/knapsack/target (kept fractions k/grid)
    allow_dense: bool = True
    max_units: int = 200_000  # knapsack table width
    max_loss: float | None = None  # target mode


@dataclass
class Allocation:
    """The chosen rank of every target (None = dense), its total cost and predicted loss."""

    allocator: str
    choices: dict[Target, Choice]
    cost: int
    predicted_loss: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator, "cost": self.cost, "predicted_loss": self.predicted_loss,
                "details": self.details,
                "choices": [{"layer": k[0], "role": k[1], "rank": v} for k, v in self.choices.items()]}


def total_cost(targets: Sequence[TargetSize], choices: Mapping[Target, Choice]) -> int:
    return sum(t.params(choices[t.key]) for t in targets)


class Allocator:
    """Base: subclasses set ``name``, ``needs`` (``spectra`` / ``predict``) and implement :meth:`choose`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""

    def allocate(self, problem: Problem) -> Allocation:
        missing = sorted(n for n in self.needs if getattr(problem, n) is None)
        if missing:
            raise PlanError(f"allocator '{self.name}' needs {', '.join(missing)} (a sensitivity profile or spectra)")
        low = sum(t.params(1) if t.max_rank else t.dense for t in problem.targets)
        if problem.cap < low:
            raise PlanError(f"allocator '{self.name}': a cap of {problem.cap:,} target parameters is below the "
                            f"smallest plan (rank 1 everywhere: {low:,})")
        alloc = self.choose(problem)
        alloc.cost = total_cost(problem.targets, alloc.choices)
        if alloc.cost > problem.cap:  # an invariant, not a user error: every allocator is built to respect it
            raise AssertionError(f"{self.name} exceeded its cap: {alloc.cost} > {problem.cap}")
        if problem.predict is not None and alloc.predicted_loss is None:
            alloc.predicted_loss = sum(problem.predict(t.key, alloc.choices[t.key]) for t in problem.targets)
        return alloc

    def choose(self, problem: Problem) -> Allocation:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    _REGISTRY[cls.name] = cls
    return cls


def get_allocator(name: str) -> Allocator:
    cls = _REGISTRY.get(str(name).strip().lower())
    if cls is None:
        raise PlanError(f"unknown allocator '{name}' (known: {', '.join(available_allocators())})")
    return cls()


def available_allocators() -> list[str]:
    return sorted(_REGISTRY)


# --- shared search over a monotone knob ------------------------------------------------------------------------
def _largest_fitting(ranks_at: Callable[[float], dict[Target, Choice]], targets: Sequence[TargetSize],
                     cap: int, lo: float, hi: float, steps: int = 60) -> tuple[float, dict[Target, Choice]]:
    """The largest knob in [lo, hi] whose choices fit ``cap`` (cost non-decreasing in the knob), by bisection."""
    best = ranks_at(lo)
    if total_cost(targets, best) > cap:
        raise PlanError(f"cap of {cap:,} target parameters is below the smallest plan")
    top = ranks_at(hi)
    if total_cost(targets, top) <= cap:
        return hi, top
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        choice = ranks_at(mid)
        if total_cost(targets, choice) <= cap:
            lo, best = mid, choice
        else:
            hi = mid
    return lo, best


@register_allocator
class Uniform(Allocator):
    """The same kept fraction f of each matrix's parameters (ranks floor to the form's count), f maximal."""

    name = "uniform"
    summary = "same kept fraction of parameters in every target"

    def choose(self, problem: Problem) -> Allocation:
        targets = problem.targets
        if problem.cap >= sum(t.dense for t in targets):
            return Allocation(self.name, {t.key: None for t in targets}, 0, details={"fraction": 1.0})

        def at(f: float) -> dict[Target, Choice]:
            return {t.key: max(1, min(t.max_rank, fraction_rank(f, t.m, t.n, t.form))) for t in targets}  # type: ignore[arg-type]

        f, choices = _largest_fitting(at, targets, problem.cap, 0.0, 1.0)
        return Allocation(self.name, choices, 0, details={"fraction": f})


@register_allocator
class Energy(Allocator):
    """Data-free: each matrix keeps the smallest rank holding τ of its squared spectrum; τ maximal."""

    name = "energy"
    needs = frozenset({"spectra"})
    summary = "per-target rank from singular-value energy, one shared threshold (data-free, WeLore-like)"

    def choose(self, problem: Problem) -> Allocation:
        targets = problem.targets
        assert problem.spectra is not None
        cumulative = {}
        for t in targets:  # normalized cumulative energy per target, so each threshold costs one search
            cum = np.cumsum(np.asarray(problem.spectra[t.key], dtype=np.float64) ** 2)
            cumulative[t.key] = cum if cum.size and cum[-1] > 0 else np.ones(1)

        def rank_at(key: Target, tau: float) -> int:
            # smallest r whose top-r energy >= tau of the total: design.ranks.energy_rank, same sums and tolerance
            cum = cumulative[key]
            return int(np.searchsorted(cum, tau * cum[-1] * (1 - 1e-12), side="left")) + 1

        def at(tau: float) -> dict[Target, Choice]:
            return {t.key: max(1, min(t.max_rank, rank_at(t.key, tau) if tau > 0 else 1)) for t in targets}

        tau, choices = _largest_fitting(at, targets, problem.cap, 0.0, 1.0)
        return Allocation(self.name, choices, 0, details={"energy_threshold": tau})


# --- profile-driven allocators ---------------------------------------------------------------------------------
def rank_grid(t: TargetSize, levels: int) -> list[int]:
    """Candidate ranks of a target: the ranks keeping k/levels of its parameters (k = 1..levels-1), and 1."""
    ranks = {1}
    for k in range(1, levels):
        r = fraction_rank(k / levels, t.m, t.n, t.form)  # type: ignore[arg-type]
        ranks.add(max(1, min(t.max_rank, r)))
    return sorted(r for r in ranks if 1 <= r <= t.max_rank)


def choice_table(problem: Problem) -> list[list[tuple[Choice, int, float]]]:
    """Per target: its options (rank or None, parameters, predicted loss), cheapest first."""
    assert problem.predict is not None
    table = []
    for t in problem.targets:
        options: list[Choice] = list(rank_grid(t, problem.grid))
        if problem.allow_dense or not options:
            options.append(None)
        table.append([(c, t.params(c), float(problem.predict(t.key, c))) for c in options])
    return table


class PredictedLossAllocator(Allocator):
    """An allocator over the per-target option table (:func:`choice_table`) of predicted losses."""

    needs = frozenset({"predict"})

    def choose(self, problem: Problem) -> Allocation:
        return self.choose_from(problem, choice_table(problem))

    def choose_from(self, problem: Problem, table: list[list[tuple[Choice, int, float]]]) -> Allocation:
        raise NotImplementedError  # pragma: no cover - abstract


@register_allocator
class Greedy(PredictedLossAllocator):
    """Marginal-gain greedy: upgrade the target with the best predicted-loss drop per parameter that fits."""

    name = "greedy"
    summary = "greedy upgrades by predicted loss drop per parameter (fast, not always optimal)"

    def choose_from(self, problem: Problem, table: list[list[tuple[Choice, int, float]]]) -> Allocation:
        pos = [0] * len(table)
        spent = sum(opts[0][1] for opts in table)
        heap: list[tuple[float, int, int]] = []

        def push(i: int) -> None:
            # the best ratio among all later options of target i that fit what is left (lets a target jump
            # over a poor step); options that do not fit now never will, since what is left only shrinks
            cur = table[i][pos[i]]
            best = None
            for j in range(pos[i] + 1, len(table[i])):
                d_cost = table[i][j][1] - cur[1]
                gain = cur[2] - table[i][j][2]
                if 0 < d_cost <= problem.cap - spent and gain > 0:
                    ratio = gain / d_cost
                    if best is None or ratio > best[0]:
                        best = (ratio, j)
            if best is not None:
                heapq.heappush(heap, (-best[0], i, best[1]))

        for i in range(len(table)):
            push(i)
        while heap:
            _, i, j = heapq.heappop(heap)
            if j <= pos[i]:
                continue
            extra = table[i][j][1] - table[i][pos[i]][1]
            if spent + extra <= problem.cap:
                spent += extra
                pos[i] = j
            push(i)  # the next upgrade of this target (or, if it no longer fitted, a cheaper one)
        choices = {t.key: table[i][pos[i]][0] for i, t in enumerate(problem.targets)}
        return Allocation(self.name, choices, 0)


def knapsack_dp(table: Sequence[Sequence[tuple[Choice, int, float]]], capacity_params: int,
                max_units: int) -> tuple[np.ndarray, list[np.ndarray], list[list[int]], int]:
    """Multiple-choice knapsack: ``dp[c]`` = least summed loss with cost <= c units (one option per target).

    Returns (dp, per-target argmin tables, integer option costs, unit). Costs are rounded up to whole units
    of ``unit`` parameters, so any solution the DP admits costs at most ``unit · C <= capacity_params``.
    """
    unit = max(1, math.ceil(capacity_params / max_units))
    C = capacity_params // unit
    costs = [[math.ceil(o[1] / unit) for o in opts] for opts in table]
    dp = np.zeros(C + 1, dtype=np.float64)
    picks: list[np.ndarray] = []
    for opts, w in zip(table, costs, strict=True):
        new = np.full(C + 1, np.inf)
        arg = np.full(C + 1, -1, dtype=np.int16)
        for k, (o, wk) in enumerate(zip(opts, w, strict=True)):
            if wk > C:
                continue
            cand = np.full(C + 1, np.inf)
            cand[wk:] = dp[: C + 1 - wk] + o[2]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        picks.append(arg)
    return dp, picks, costs, unit


def backtrack(picks: Sequence[np.ndarray], costs: Sequence[Sequence[int]], c: int) -> list[int]:
    """Option index per target of the DP's optimum with cost <= c units."""
    out = [0] * len(picks)
    for i in range(len(picks) - 1, -1, -1):
        k = int(picks[i][c])
        if k < 0:
            raise AssertionError("knapsack backtrack reached an infeasible cell")
        out[i] = k
        c -= costs[i][k]
    return out


@register_allocator
class Knapsack(PredictedLossAllocator):
    """Exact multiple-choice knapsack (DP) minimizing the summed predicted loss under the cap."""

    name = "knapsack"
    summary = "exact DP minimizing summed predicted loss under the budget (targets may stay dense)"

    def choose_from(self, problem: Problem, table: list[list[tuple[Choice, int, float]]]) -> Allocation:
        dp, picks, costs, unit = knapsack_dp(table, problem.cap, problem.max_units)
        C = len(dp) - 1
        if not math.isfinite(dp[C]):
            raise PlanError(f"knapsack: no plan fits {problem.cap:,} target parameters at cost unit {unit}; "
                            "raise the budget or --max-units")
        idx = backtrack(picks, costs, C)
        choices = {t.key: table[i][idx[i]][0] for i, t in enumerate(problem.targets)}
        return Allocation(self.name, choices, 0, predicted_loss=float(dp[C]),
                          details={"cost_unit_params": unit, "grid": problem.grid})


@register_allocator
class TargetLoss(PredictedLossAllocator):
    """ASVD's mode: the smallest plan whose summed predicted loss is <= ``max_loss`` (within the cap)."""

    name = "target"
    needs = frozenset({"predict", "max_loss"})
    summary = "smallest model whose predicted proxy loss stays under --max-loss (binary search, ASVD-style)"

    def choose_from(self, problem: Problem, table: list[list[tuple[Choice, int, float]]]) -> Allocation:
        assert problem.max_loss is not None
        dp, picks, costs, unit = knapsack_dp(table, problem.cap, problem.max_units)
        # dp is non-increasing in c: binary search for the smallest c with dp[c] <= max_loss
        lo, hi = 0, len(dp) - 1
        if not dp[hi] <= problem.max_loss:
            raise PlanError(f"target: no plan within the budget keeps the predicted loss under {problem.max_loss:g} "
                            f"(best: {dp[hi]:.4g}); raise --budget or --max-loss")
        while lo < hi:
            mid = (lo + hi) // 2
            if dp[mid] <= problem.max_loss:
                hi = mid
            else:
                lo = mid + 1
        idx = backtrack(picks, costs, lo)
        choices = {t.key: table[i][idx[i]][0] for i, t in enumerate(problem.targets)}
        return Allocation(self.name, choices, 0, predicted_loss=float(dp[lo]),
                          details={"cost_unit_params": unit, "max_loss": problem.max_loss, "grid": problem.grid})

"""From a budget to a plan: measure what the allocator needs, allocate, and write a plan ``decompose`` takes.

:func:`allocate_plan` is what ``rankwise allocate`` runs. The plan it returns decomposes every target with
one method at the allocated exact rank (one override per target; ``skip: true`` for a target left dense),
or, for the ``removal`` allocator, drops the least influential whole blocks (ShortGPT's Block Influence,
1 − cos(block input, block output), measured on the profile's proxy sequences) until the budget is met.
The result says the budget, its unit and the achieved size in *every* unit, so no ratio is ambiguous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rankwise.allocation.allocators import Allocation, Problem, get_allocator
from rankwise.allocation.budget import Accounting, Budget, Target, accounting_for
from rankwise.allocation.sensitivity import (
    ProfileSettings,
    SensitivityProfile,
    TailRunner,
    profile,
    proxy_ids,
)
from rankwise.analysis.spectrum import singular_values
from rankwise.calibration.data import CalibrationConfig
from rankwise.decomposition import get_method
from rankwise.design.plan import Plan
from rankwise.errors import PlanError
from rankwise.models.adapters import adapter_for

REMOVAL = "removal"


@dataclass
class AllocationResult:
    """The plan plus everything needed to judge it: budget, achieved size per unit, choices, profile."""

    plan: Plan
    budget: Budget
    accounting: Accounting
    achieved: dict[str, float]
    allocation: Allocation | None = None
    removed_layers: tuple[int, ...] = ()
    profile: SensitivityProfile | None = None
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def kept_fractions(self) -> dict[Target, float]:
        """Per target: kept parameters / dense parameters (0 for a removed block's targets)."""
        out = {}
        for t in self.accounting.targets:
            if t.layer in self.removed_layers:
                out[t.key] = 0.0
            elif self.allocation is None:
                out[t.key] = 1.0
            else:
                out[t.key] = t.params(self.allocation.choices[t.key]) / t.dense
        return out

    def to_dict(self) -> dict[str, Any]:
        acc = self.accounting
        return {
            "budget": self.budget.to_dict(),
            "achieved": {
                "model-params": self.achieved["model-params"],
                "decoder-params": self.achieved["decoder-params"],
                "bytes": int(self.achieved["bytes"]),
                "params": int(self.achieved["params"]),
                "meaning": "kept fraction of the whole model's parameters / of decoder linear weight parameters; "
                           "bytes and count of the whole model's parameters",
            },
            "model_params": acc.model_params, "decoder_params": acc.decoder_params,
            "bytes_per_param": acc.bytes_per_param,
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
            "removed_layers": list(self.removed_layers),
            "profile": None if self.profile is None else {
                "key": self.profile.key, "cache_hit": self.profile.cache_hit, "seconds": self.profile.seconds,
                "settings": self.profile.to_dict()["settings"], "meta": self.profile.meta,
                "dense_nll": self.profile.dense_nll, "block_influence": self.profile.block_influence},
            "plan": self.plan.to_dict(), "seconds": self.seconds, **self.meta,
        }


def weight_spectra(model: nn.Module) -> dict[Target, list[float]]:
    """Each target weight's singular values (data-free; for the energy allocator)."""
    adapter = adapter_for(model)
    return {(t.layer, t.role): singular_values(adapter.weight(t.layer, t.role)).tolist() for t in adapter.targets()}


def removal_layers(accounting: Accounting, budget: Budget, influence: list[float]) -> tuple[int, ...]:
    """The fewest least-influential blocks whose removal meets ``budget`` (never over it)."""
    order = sorted(range(len(influence)), key=lambda i: influence[i])
    removed: list[int] = []
    for layer in order:
        kept = sum(t.dense for t in accounting.targets if t.layer not in removed)
        if accounting.measure(kept, removed)[budget.unit] <= budget.value:
            return tuple(sorted(removed))
        removed.append(layer)
    raise PlanError(f"removal: only removing all {len(removed)} blocks would meet {budget.describe()}; "
                    "a model needs at least one")


def allocate_plan(model: nn.Module, tokenizer: Any, budget: Budget, *, method: str = "svd-llm",
                  allocator: str = "knapsack", compensate: bool | str = False, max_loss: float | None = None,
                  calibration: CalibrationConfig | None = None, settings: ProfileSettings | None = None,
                  grid: int = 32, use_cache: bool = True, progress: bool = True, name: str = "",
                  ) -> AllocationResult:
    """Allocate ranks for ``model`` under ``budget`` and return the plan with its accounting."""
    t0 = time.perf_counter()
    meth = get_method(method)
    form = meth.form
    accounting = accounting_for(model, form)
    settings = settings or ProfileSettings(method=meth.name)
    if settings.method != meth.name:
        raise PlanError(f"profile settings are for method '{settings.method}', allocating for '{meth.name}'")
    calibration = calibration or CalibrationConfig()
    prof: SensitivityProfile | None = None
    label = f"{allocator}: {meth.name if allocator != REMOVAL else 'layer removal'} at {budget.describe()}"
    if allocator == REMOVAL:
        ids = proxy_ids(tokenizer, settings, calibration.data_dir)
        runner = TailRunner(model, adapter_for(model), ids)
        influence = runner.block_influence()
        del runner
        removed = removal_layers(accounting, budget, influence)
        plan = Plan.from_dict({"name": label, "method": meth.name, "remove_layers": list(removed),
                               "overrides": [{"layers": "all", "tensors": "all", "skip": True}]})
        kept = sum(t.dense for t in accounting.targets if t.layer not in removed)
        return AllocationResult(plan, budget, accounting, accounting.measure(kept, removed), None, removed, None,
                                time.perf_counter() - t0, {"block_influence": influence})
    alloc_obj = get_allocator(allocator)
    cap = accounting.check(budget)
    problem = Problem(targets=accounting.targets, cap=cap, grid=grid, max_loss=max_loss)
    if "spectra" in alloc_obj.needs:
        problem.spectra = weight_spectra(model)
    if "predict" in alloc_obj.needs:
        prof = profile(model, tokenizer, settings, calibration=calibration, use_cache=use_cache,
                       progress=progress, name=name, form=form)
        problem.predict = prof.predictor()
    allocation = alloc_obj.allocate(problem)
    overrides: list[dict[str, Any]] = []
    for t in accounting.targets:
        rank = allocation.choices[t.key]
        rule: dict[str, Any] = {"layers": [t.layer], "tensors": [t.role]}
        rule.update({"skip": True} if rank is None else {"rank": int(rank)})
        overrides.append(rule)
    plan = Plan.from_dict({"name": label, "method": meth.name, "rank": 1, "layers": "all", "tensors": "all",
                           "compensate": compensate, "overrides": overrides})
    achieved = accounting.measure(allocation.cost)
    return AllocationResult(plan, budget, accounting, achieved, allocation, (), prof, time.perf_counter() - t0,
                            {"cap_target_params": cap})


def rank_map_targets(result: AllocationResult) -> list[dict[str, Any]]:
    """Every target as a decomposition report lists it (layer, role, dense and kept parameters, rank): what the
    report's rank map draws, so an allocated plan and a decomposed model are drawn by one figure."""
    out = []
    for t in result.accounting.targets:
        if t.layer in result.removed_layers:
            out.append({"layer": t.layer, "role": t.role, "params_before": t.dense, "params_after": 0, "ranks": [0]})
            continue
        rank = None if result.allocation is None else result.allocation.choices[t.key]
        out.append({"layer": t.layer, "role": t.role, "params_before": t.dense, "params_after": t.params(rank),
                    "ranks": [] if rank is None else [rank], "kept_dense": rank is None})
    return out

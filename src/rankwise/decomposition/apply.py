"""Applying a plan: replace exactly the planned ``nn.Linear`` modules of a model by factorized layers.

:func:`decompose_` (in place, hence the trailing underscore, as torchao's ``quantize_``) is the mechanism behind ``rankwise decompose`` and the Python API. It

1. resolves the plan against the model's adapter (layers, roles, ranks and method names are checked
   before anything changes), and checks every planned weight for NaN/Inf up front, so bad input never
   leaves a half-decomposed model;
2. collects the calibration statistics the chosen methods need, once, in a single pass shared by all
   targets (and cached on disk: a second run with the same model and data skips the pass);
3. walks the targets layer by layer, replacing each Linear in place and dropping its dense weight (and its
   statistics) before the next one, so the extra memory is one target's factors and temporaries at a time;
   there is no copy of the model.

Form and folding (``fold``): ``"auto"`` (the default) keeps each method's natural form: Tucker stays the
paper's three-factor layer d_in → r → r → d_out (r(m+n)+r² parameters, parity with the paper's counts),
two-factor methods (SVD, ASVD, SVD-LLM, FWSVD) are two Linears (r(m+n)). ``fold=True`` folds Tucker's core
into A (two Linears, r² fewer parameters, one matmul less: faster); ``fold=False`` keeps any core a method
returns.

Break-even: a target whose resolved rank would give *more* parameters than the dense matrix (r(m+n)+r² > mn
three-factor, r(m+n) > mn two-factor) is kept dense and the report says why, unless the plan sets
``force: true`` for it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.calibration.cache import cached_stats
from rankwise.calibration.data import CalibrationConfig, calibration_ids
from rankwise.decomposition import available_methods, compensation, get_method
from rankwise.decomposition.base import (
    CalibrationStats,
    DecompositionMethod,
    check_weight,
    relative_error,
    weighted_error,
)
from rankwise.decomposition.removal import remove_blocks
from rankwise.decomposition.report import DecompositionReport, TargetReport
from rankwise.design.plan import DecompSpec, Plan
from rankwise.design.ranks import break_even_rank, break_even_rank_three_factor, factor_params, resolve_rank
from rankwise.errors import DataError, PlanError
from rankwise.layers.factorized import FactorizedLinear
from rankwise.layers.modules import REPORT_ATTR, is_factorized, merge_
from rankwise.models.adapters import ArchitectureAdapter, TargetInfo, adapter_for
from rankwise.models.zoo import param_size

#: What ``calibration=`` may be: nothing (defaults), settings, token windows, or statistics per module name.
Calibration = CalibrationConfig | torch.Tensor | Mapping[str, CalibrationStats] | None



def parse_fold(value: object) -> str | bool:
    """``auto`` / ``true`` / ``false`` (strings or bools) to ``"auto"``, True or False."""
    if isinstance(value, bool) or value == "auto":
        return value  # type: ignore[return-value]
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PlanError(f"fold: {value!r} must be auto, true or false")


def as_plan(plan: Plan | Mapping[str, Any] | str | Path) -> Plan:
    """A Plan from a Plan, a mapping (plan fields) or a YAML/JSON file path."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    if isinstance(plan, str | Path):
        return Plan.from_file(plan)
    raise PlanError(f"plan: expected a Plan, a mapping or a file path, got {type(plan).__name__}")


#: (parameters, bytes of parameters): :func:`rankwise.models.zoo.param_size` under its old name here.
model_size = param_size


# --- planning -----------------------------------------------------------------------------------------------
def resolve_targets(model: nn.Module, plan: Plan) -> tuple[ArchitectureAdapter, list[tuple[TargetInfo, DecompSpec]]]:
    """The planned targets with their specs, validated against the model (nothing is changed)."""
    adapter = adapter_for(model)
    targets = adapter.targets()
    specs = plan.resolve(targets, adapter.roles, adapter.role_groups(), known_methods=available_methods())
    by_key = {(t.layer, t.role): t for t in targets}
    chosen = [(by_key[key], spec) for key, spec in specs.items()]
    for info, _ in chosen:
        if is_factorized(adapter.linear(info.layer, info.role)):
            raise PlanError(f"layer {info.layer} {info.role} ({info.name}) is already factorized")
    return adapter, chosen


def check_weights(adapter: ArchitectureAdapter, chosen: list[tuple[TargetInfo, DecompSpec]]) -> None:
    """NaN/Inf in any planned weight is a DecompositionError before any module is replaced."""
    for info, spec in chosen:
        check_weight(adapter.weight(info.layer, info.role), f"{spec.method} on {info.name}")


def stats_request(chosen: list[tuple[TargetInfo, DecompSpec]],
                  methods: Mapping[str, DecompositionMethod]) -> dict[str, frozenset[str]]:
    """Module name -> statistics to collect for it (targets whose method needs none are left out).

    Data-aware targets also get the input Gram, whatever their method reads, so the report can give every
    data-aware method the same yardstick: the whitened error, i.e. the relative error of the layer's
    outputs on the calibration tokens.
    """
    return {info.name: frozenset(methods[spec.method].needs) | {"gram"} for info, spec in chosen
            if methods[spec.method].needs}


def _max_length(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def gather_stats(model: nn.Module, request: Mapping[str, frozenset[str]], calibration: Calibration,
                 tokenizer: Any, use_cache: bool, progress: bool
                 ) -> tuple[dict[str, CalibrationStats], dict[str, Any] | None, bool]:
    """The statistics for ``request``: (stats by module name, how they were obtained, whether we own them)."""
    if isinstance(calibration, Mapping):
        stats = dict(calibration)
        for name, fields in request.items():
            st = stats.get(name)
            missing = sorted(f for f in fields if st is None or getattr(st, f, None) is None)
            if missing:
                raise DataError(f"calibration statistics for {name} lack {', '.join(missing)}")
        return stats, {"source": "precomputed statistics"}, False
    if not request:
        return {}, None, True
    config = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig()
    if isinstance(calibration, torch.Tensor):
        ids, settings = calibration, {"source": "token ids given by the caller"}
    else:
        if tokenizer is None:
            methods = sorted({f for fields in request.values() for f in fields})
            raise DataError(f"calibration ({', '.join(methods)}) needs the model's tokenizer: pass tokenizer=...")
        ids, settings = calibration_ids(tokenizer, config, _max_length(model)), config.describe()
    with _bar(progress, "calibration") as update:
        stats, run = cached_stats(model, ids, request, settings=settings, batch_size=config.batch_size,
                                  use_cache=use_cache, progress=update)
    return stats, run.to_dict(), True


# --- the loop -----------------------------------------------------------------------------------------------
def decompose_(model: nn.Module, plan: Plan | Mapping[str, Any] | str | Path, calibration: Calibration = None, *,
              tokenizer: Any = None, fold: str | bool | None = None, progress: bool = True,
              use_cache: bool = True, name: str | None = None) -> DecompositionReport:
    """Decompose ``model`` in place as ``plan`` says; returns the per-target and whole-model report.

    ``calibration`` is only used when a planned method needs statistics: a :class:`CalibrationConfig`
    (default: 128 × 512-token windows of WikiText-2 validation, which needs ``tokenizer``), an N × L tensor
    of token ids, or precomputed :class:`CalibrationStats` by module name. ``fold`` overrides the plan's
    ``fold`` (see the module docstring). Errors in the plan, the data or the weights are raised before the
    model changes.
    """
    t_start = time.perf_counter()
    plan = as_plan(plan)
    fold_mode = parse_fold(plan.fold if fold is None else fold)
    adapter, chosen = resolve_targets(model, plan)
    methods = {spec.method: get_method(spec.method) for _, spec in chosen}
    check_weights(adapter, chosen)
    request = stats_request(chosen, methods)
    if plan.compensate is True:  # the least-squares refit reads every target's input Gram, data-free methods too
        request = {info.name: request.get(info.name, frozenset()) | {"gram"} for info, _ in chosen}
    if plan.compensate == "sequential":  # statistics come from the compressed model itself, layer by layer
        ids, calib_info = compensation.calibration_tokens(model, calibration, tokenizer)
        stats, own_stats = {}, True
    else:
        stats, calib_info, own_stats = gather_stats(model, request, calibration, tokenizer, use_cache, progress)
    params_before, bytes_before = model_size(model)
    records: list[TargetReport] = []
    with _bar(progress, "decompose", total=len(chosen)) as update:
        if plan.compensate == "sequential":
            def one(info: TargetInfo, spec: DecompSpec, method: DecompositionMethod, st: CalibrationStats) -> Any:
                return _decompose_target(adapter, info, spec, method, st, fold_mode)

            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                update(done[0], len(chosen))

            batch = calibration.batch_size if isinstance(calibration, CalibrationConfig) else 4
            records = compensation.decompose_sequential(model, adapter, chosen, methods, ids, one, batch, advance)
        for i, (info, spec) in enumerate(chosen if plan.compensate != "sequential" else ()):
            st = stats.pop(info.name, None) if own_stats else stats.get(info.name)
            dense = adapter.weight(info.layer, info.role).detach().clone() if plan.compensate else None
            records.append(_decompose_target(adapter, info, spec, methods[spec.method], st, fold_mode))
            if dense is not None and st is not None and st.gram is not None:
                layer = adapter.linear(info.layer, info.role)
                if isinstance(layer, FactorizedLinear):
                    compensation.refit_output_factor(layer, dense, st.gram, st.gram)
                    compensation.refresh_errors(records[-1], layer, dense, st.gram)
            del st, dense
            update(i + 1, len(chosen))
    if plan.remove_layers:  # whole blocks dropped after the decompositions (layer numbers are the original ones)
        remove_blocks(model, plan.remove_layers)
    params_after, bytes_after = model_size(model)
    first = next(model.parameters(), None)
    report = DecompositionReport(
        model=name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        plan=plan.to_dict(), fold=str(fold_mode).lower(), targets=records,
        params_before=params_before, params_after=params_after, bytes_before=bytes_before,
        bytes_after=bytes_after, seconds=time.perf_counter() - t_start, calibration=calib_info,
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else "")
    setattr(model, REPORT_ATTR, report)
    return report


def _decompose_target(adapter: ArchitectureAdapter, info: TargetInfo, spec: DecompSpec,
                      method: DecompositionMethod, stats: CalibrationStats | None,
                      fold_mode: str | bool) -> TargetReport:
    """Decompose one target and swap it in (or keep it dense above break-even); returns its record."""
    t0 = time.perf_counter()
    module = adapter.linear(info.layer, info.role)
    # A fresh (64-byte aligned) copy: BLAS sums in an alignment-dependent order, and weights memory-mapped
    # from safetensors sit at arbitrary offsets; copying makes the factors independent of where W lives.
    # adapter.weight is (out, in) for every module kind (a transposed view of a Conv1D's (in, out) weight).
    weight = adapter.weight(info.layer, info.role).detach().clone(memory_format=torch.contiguous_format)
    if stats is not None and stats.fisher is not None and stats.fisher.dim() == 2 \
            and adapter.is_transposed(info.layer, info.role):
        stats = dataclasses.replace(stats, fisher=stats.fisher.T)  # Conv1D gradients are (in, out) too
    m, n = info.out_features, info.in_features
    bias_params = m if info.bias else 0
    fold_this = fold_mode is True or (fold_mode == "auto" and method.form != "three_factor")
    three = method.form == "three_factor" and not fold_this
    count_form = "three_factor" if three else "two_factor"
    spectrum = method.singular_values(weight, stats).tolist() if spec.rank.kind == "energy" else None
    r = resolve_rank(spec.rank, m, n, spectrum, form=count_form, field=f"rank (layer {info.layer} {info.role})")
    base = TargetReport(layer=info.layer, role=info.role, name=info.name, method=spec.method, shape=(m, n),
                        rank_spec=str(spec.rank), ranks=(r, r), form="dense", params_before=m * n + bias_params,
                        params_after=m * n + bias_params, rel_error=None, weighted_error=None)
    if factor_params(r, m, n, count_form) > m * n and not spec.force:
        r_star = break_even_rank_three_factor(m, n) if three else math.floor(break_even_rank(m, n))
        base.kept_dense = True
        base.reason = (f"kept dense: rank {r} above break-even r* = {r_star} "
                       f"({'three' if three else 'two'}-factor, {m}x{n}); force: true overrides")
        base.seconds = time.perf_counter() - t0
        return base
    result = method.decompose(weight, r, stats)
    factors = result.factors
    base.fallbacks, base.solver = list(result.fallbacks), result.solver
    layer = FactorizedLinear.from_factors(factors.A, factors.G, factors.B, bias=module.bias, fold=fold_this,
                                          dtype=weight.dtype)
    del result, factors
    dense = layer.dense_weight()
    base.rel_error = relative_error(weight, dense)
    if stats is not None and stats.gram is not None:
        base.weighted_error = weighted_error(weight, dense, stats.gram)
    del dense
    base.ranks = (layer.shape.rank_out, layer.shape.rank_in)
    base.form = layer.shape.form
    base.params_after = layer.shape.params
    adapter.replace(info.layer, info.role, layer)
    del module, weight  # the dense weight is freed here: the model no longer references it
    base.seconds = time.perf_counter() - t0
    return base


# --- undoing ------------------------------------------------------------------------------------------------
#: :func:`rankwise.layers.merge_`, re-exported: undoing is the inverse of this module's work.
merge = merge_


# --- progress -----------------------------------------------------------------------------------------------
@contextmanager
def _bar(enabled: bool, label: str, total: int | None = None) -> Iterator[Any]:
    """A rich progress bar with ETA (on stderr); yields ``update(done, total)``."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done, tot: bar.update(task, completed=done, total=tot)


#: Today's names, kept as thin aliases for one release: use :func:`decompose_` and :func:`merge_`.
decompose = decompose_

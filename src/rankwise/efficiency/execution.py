"""Choosing how each factorized target executes, by measuring it on the actual device.

A factorized layer can run as the paper's three matmuls (x → Bᵀ → G → A), as two (A·G folded), or be
merged back into one dense matmul. Fewer FLOPs and bytes do not guarantee less time: tiny GEMMs have fixed
costs (kernel launches, framework dispatch), so a plain factorized checkpoint is often *slower* than dense
(field notes: 25-35% slower decode at batch 1). :func:`choose_execution` therefore

1. micro-benchmarks every unique factorized shape in each candidate form at representative token counts
   (decode: 1 and 8 tokens; prefill: 512), caching the results as JSON under
   ``cache_dir()/execution/<device>-<dtype>-t<threads>.json`` so a shape is measured once per machine;
2. picks, for every factor matrix of those forms, the faster memory layout: row-major (out, in) as
   ``nn.Linear`` stores it, or column-major (the transpose stored contiguously). ``F.linear`` then streams
   rows of length ``out`` instead of computing ``out`` short dot products of length ``in``; for the tall
   d×r "last" factors that is up to 2x the bandwidth at one token on CPU (1536×209: 214 → 100 µs measured
   here). Column-major is chosen only where it is faster at some token count and slower at none beyond noise;
3. picks per target the factorized form whose *worst* ratio to dense time over those token counts is
   lowest (minimax), and keeps it unless dense beats it at some token count by more than the measurement
   can resolve (the larger of ``margin`` and the blocks' own median/min spread); otherwise dense;
4. converts the model in place (fold, merge, re-layout) and, with ``guard=True``, times end-to-end decode against
   the dense-equivalent model and merges the targets with the least benefit until it is not slower (slower
   means: both the median and the fastest run are slower by more than ``guard_tolerance`` and by more than
   the runs' own interquartile spread).

Micro-benchmark protocol: each form's weights are replicated into enough copies to exceed twice the last-
level cache and the calls cycle through them, so weights stream from memory as they do inside a model (a
single hot copy would sit in cache and flatter the dense form). Calls are timed in blocks of at least
2 ms, forms interleaved block by block; the choice uses the fastest block per form (on a shared machine
other processes only ever add time), the median gives the noise allowance.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from rankwise.efficiency.accounting import TargetRecord
from rankwise.efficiency.microbench import (  # noqa: F401  (re-exported: the module's public names before the split)
    DEFAULT_TOKENS,
    FORMS,
    FormTiming,
    TimingCache,
    benchmark_matrix,
    benchmark_shape,
    device_name,
    shape_forms,
)
from rankwise.efficiency.policy import _describe, choose_form, choose_layout, form_params, shape_layouts  # noqa: F401
from rankwise.errors import RankwiseError
from rankwise.layers.factorized import FactorizedLinear, FactorizedShape, Layout
from rankwise.layers.modules import REPORT_ATTR, is_factorized, merge_factorized_
from rankwise.models.adapters import adapter_for
from rankwise.models.zoo import count_params

#: Attribute on a model holding the last :func:`choose_execution` report.
EXECUTION_ATTR = "_rankwise_execution"


# --- the report -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetChoice(TargetRecord):
    """How one target executes now, and the measurements behind the choice."""

    original_form: str  # "three_factor", "two_factor" or "dense"
    ranks: tuple[int, int] | None
    form: str  # the form it executes in now
    reason: str
    timings_us: dict[int, dict[str, float]] = field(default_factory=dict)  # tokens -> form -> min µs
    params_before: int = 0
    params_after: int = 0
    layouts: dict[str, str] | None = None  # factor -> "row"/"col" memory layout, when factorized

    def speedup_at(self, tokens: int) -> float | None:
        """Dense time / chosen form's time at ``tokens`` (from the micro-benchmark)."""
        row = self.timings_us.get(tokens)
        if not row or self.form not in row:
            return None
        return row["dense"] / row[self.form]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "timings_us": {str(t): v for t, v in self.timings_us.items()}}


@dataclass
class GuardRound:
    """One end-to-end check: decomposed vs dense-equivalent decode time, and what was merged after it."""

    round: int
    ratio: float  # decomposed / dense decode time: the smaller of the median and min ratios, worst batch size
    per_batch: dict[int, dict[str, float]]
    factorized_targets: int
    allowance: float = 0.0  # the slack granted: max(tolerance, IQR of the runs)
    merged_after: list[str] = field(default_factory=list)


@dataclass
class ExecutionReport:
    """What :func:`choose_execution` decided for every target, and why."""

    device: str
    dtype: str
    threads: int
    cache_file: str
    token_counts: tuple[int, ...]
    targets: list[TargetChoice]
    guard: list[GuardRound] = field(default_factory=list)
    guard_tolerance: float = 0.02
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """Targets per execution form; ``merged`` = factorized but executed dense, ``not_factorized`` = dense
        in the model as given (not planned, or kept dense above break-even)."""
        out = {"three_factor": 0, "two_factor": 0, "merged": 0, "not_factorized": 0}
        for t in self.targets:
            key = t.form if t.form != "dense" else ("not_factorized" if t.original_form == "dense" else "merged")
            out[key] = out.get(key, 0) + 1
        return out

    def layout_counts(self) -> dict[str, int]:
        """Factor weights of the factorized targets by memory layout (``row``: as nn.Linear, ``col``: transposed)."""
        out = {"row": 0, "col": 0}
        for t in self.targets:
            for layout in (t.layouts or {}).values():
                out[layout] += 1
        return out

    @property
    def not_slower(self) -> bool | None:
        """Whether the last guard round found the model within tolerance of dense (None: no guard ran)."""
        return None if not self.guard else self.guard[-1].ratio <= 1.0 + self.guard[-1].allowance

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "dtype": self.dtype, "threads": self.threads, "cache_file": self.cache_file,
            "token_counts": list(self.token_counts), "counts": self.counts(), "layouts": self.layout_counts(),
            "params_before": self.params_before, "params_after": self.params_after, "seconds": self.seconds,
            "guard_tolerance": self.guard_tolerance, "not_slower_than_dense": self.not_slower,
            "guard": [asdict(g) | {"per_batch": {str(k): v for k, v in g.per_batch.items()}} for g in self.guard],
            "targets": [t.to_dict() for t in self.targets],
            "protocol": ("per-layer: min of 7 interleaved blocks (>= 2 ms each) per form, weights cycled through "
                         "copies larger than 2x the last-level cache; guard: median end-to-end decode, "
                         "interleaved with the dense-equivalent model"),
        }

    def table(self, max_rows: int | None = 40) -> Any:
        """A rich table: one row per target (or per distinct decision when there are many)."""
        from rich.table import Table

        table = Table(title=f"execution forms on {self.device} ({self.dtype}, {self.threads} threads): "
                            + ", ".join(f"{k} {v}" for k, v in self.counts().items()))
        table.add_column("layer", justify="right")
        table.add_column("role")
        table.add_column("ranks")
        table.add_column("form")
        for t in self.token_counts:
            table.add_column(f"µs dense/3f/2f @{t}", justify="right")
        table.add_column("why")
        rows = self.targets if max_rows is None or len(self.targets) <= max_rows else self.targets[:max_rows]
        for c in rows:
            cells = [str(c.layer), c.role, "-" if not c.ranks else f"{c.ranks[0]}x{c.ranks[1]}", c.form]
            for t in self.token_counts:
                row = c.timings_us.get(t, {})
                cells.append("/".join(f"{row[f]:.0f}" if f in row else "-" for f in ("dense", "three_factor",
                                                                                      "two_factor")) if row else "-")
            cells.append(c.reason)
            table.add_row(*cells)
        if rows is not self.targets:
            table.caption = f"first {max_rows} of {len(self.targets)} targets (all in the JSON)"
        return table


# --- applying ---------------------------------------------------------------------------------------------
def _params(module: nn.Module) -> int:
    return count_params(module)


def _kept_dense_reasons(model: nn.Module) -> dict[str, str]:
    """Reasons the decomposition left planned targets dense (break-even), from its attached report."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        return {}
    return {t.name: t.reason for t in report.targets if t.kept_dense}


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


@dataclass(frozen=True)
class ExecutionConfig:
    """How :func:`choose_execution` measures and decides (defaults sized for a 2-core CPU).

    ``device``/``dtype`` default to the model's own and must match it (timings are only valid there).
    ``guard=True`` also times end-to-end decode (batch sizes ``guard_batch_sizes``) against the reference
    and merges the least useful factorized targets, half of the remaining ones per round, until the model is
    within ``guard_tolerance`` (or the runs' own spread, if larger) of dense or nothing factorized is left.
    ``layouts=True`` also picks, per factor, the faster of the row-major (out, in) and column-major storage
    by timing each factor's matrix shape (:func:`shape_layouts`); forms are then timed in those layouts.
    """

    device: str | None = None
    dtype: str | None = None
    token_counts: tuple[int, ...] = DEFAULT_TOKENS
    guard: bool = False
    guard_batch_sizes: tuple[int, ...] = (1,)
    guard_context: int = 64
    guard_tokens: int = 8
    guard_repeats: int = 5
    guard_tolerance: float = 0.02
    blocks: int = 7
    margin: float = 0.03
    remeasure: bool = False
    layouts: bool = True
    use_cache: bool = True


def choose_execution(model: nn.Module, config: ExecutionConfig | None = None, *,
                     reference: nn.Module | None = None, progress: Callable[[int, int], None] | None = None,
                     **settings: Any) -> ExecutionReport:
    """Convert every factorized target of ``model`` in place to its fastest measured form; report why.

    ``config`` says how to measure (:class:`ExecutionConfig`); keyword ``settings`` override its fields
    (``choose_execution(model, guard=True)``). ``reference`` is the guard's dense model (default: a deep copy
    with every factorized layer merged, which has the dense model's shapes). The report is also attached to
    the model as ``model._rankwise_execution`` (for savers and tools).
    """
    config = replace(config or ExecutionConfig(), **settings)
    device, dtype, token_counts, guard = config.device, config.dtype, config.token_counts, config.guard
    blocks, margin, remeasure, layouts = config.blocks, config.margin, config.remeasure, config.layouts
    guard_tolerance = config.guard_tolerance
    from rankwise.models import parse_dtype

    t_start = time.perf_counter()
    model_dtype, model_device = _model_dtype_device(model)
    dev = torch.device(device) if device is not None else model_device
    want = parse_dtype(dtype) if dtype is not None else model_dtype
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RankwiseError("device cuda: no CUDA device is available on this machine")
    if dev.type != model_device.type or want != model_dtype:
        raise RankwiseError(f"the model is {str(model_dtype).removeprefix('torch.')} on {model_device}, not "
                            f"{str(want).removeprefix('torch.')} on {dev}: move/convert it first")
    threads = torch.get_num_threads()
    cache = TimingCache.for_device(dev, want, threads) if config.use_cache else None
    adapter = adapter_for(model)
    kept = _kept_dense_reasons(model)
    params_before = _params(model)
    tokens = tuple(sorted(set(int(t) for t in token_counts)))
    if not tokens or tokens[0] < 1:
        raise RankwiseError(f"token counts must be positive integers, got {list(token_counts)}")

    targets = adapter.targets()
    measured: dict[FactorizedShape, tuple[dict[int, dict[str, FormTiming]], dict[str, dict[str, Layout]]]] = {}
    choices: list[TargetChoice] = []
    for i, info in enumerate(targets):
        module = adapter.linear(info.layer, info.role)
        if not isinstance(module, FactorizedLinear):
            foreign = is_factorized(module)
            reason = ("left as is: a factorized layer of another implementation (load with rankwise.load)"
                      if foreign else kept.get(info.name) or "dense: not factorized in this model")
            choices.append(TargetChoice(layer=info.layer, role=info.role, name=info.name, shape=info.shape,
                                        original_form="foreign" if foreign else "dense", ranks=None,
                                        form="foreign" if foreign else "dense", reason=reason,
                                        params_before=_params(module), params_after=_params(module)))
            continue
        shape = module.shape
        if shape not in measured:
            lay = shape_layouts(shape, tokens, dev, want, cache, blocks, remeasure, margin) if layouts else {}
            measured[shape] = (benchmark_shape(shape, tokens, dev, want, cache, blocks, remeasure, lay), lay)
        timings, lay = measured[shape]
        form, scores, allowance = choose_form(timings, margin, form_params(shape))
        new = module
        if form == "dense":
            new = module.merge()
        elif form == "two_factor" and shape.form == "three_factor":
            new = module.folded()
        if isinstance(new, FactorizedLinear):
            new.set_layouts(lay.get(form, {name: "row" for name in new.factors()}))
        if new is not module:
            adapter.replace(info.layer, info.role, new)
        choices.append(TargetChoice(
            layer=info.layer, role=info.role, name=info.name, shape=info.shape, original_form=shape.form,
            ranks=(shape.rank_out, shape.rank_in), form=form,
            reason=_describe(form, scores, timings, allowance, lay.get(form)),
            timings_us={t: {f: v.min_us for f, v in row.items()} for t, row in timings.items()},
            params_before=_params(module), params_after=_params(new),
            layouts=dict(new.layouts) if isinstance(new, FactorizedLinear) else None))
        if progress is not None:
            progress(i + 1, len(targets))
    if cache is not None and measured:
        cache.save()
    report = ExecutionReport(device=f"{dev.type}: {device_name(dev)}", dtype=str(want).removeprefix("torch."),
                             threads=threads, cache_file=str(cache.path) if cache else "", token_counts=tokens,
                             targets=choices, guard_tolerance=guard_tolerance, params_before=params_before)
    if guard:
        report.guard = decode_guard(model, choices, reference, dev, config.guard_batch_sizes,
                                    config.guard_context, config.guard_tokens, config.guard_repeats,
                                    guard_tolerance)
    report.params_after = _params(model)
    report.seconds = time.perf_counter() - t_start
    setattr(model, EXECUTION_ATTR, report)
    return report


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every factorized layer merged: the dense model's shapes (its speed, not its weights)."""
    return merge_factorized_(copy.deepcopy(model))


def decode_guard(model: nn.Module, choices: list[TargetChoice], reference: nn.Module | None,
                 device: torch.device, batch_sizes: Sequence[int], context: int, new_tokens: int,
                 repeats: int, tolerance: float, max_rounds: int = 10) -> list[GuardRound]:
    """Merge factorized targets (least micro-benchmark benefit first) until decode is not slower than dense."""
    from rankwise.efficiency.timing import Workload, measure

    ref = reference if reference is not None else merged_copy(model)
    adapter = adapter_for(model)
    workloads = [Workload("decode", batch=b, seq_len=context, new_tokens=new_tokens) for b in batch_sizes]
    rounds: list[GuardRound] = []
    for r in range(max_rounds):
        results = measure({"dense": ref, "decomposed": model}, workloads, repeats=repeats, warmup=1,
                          device=device, memory=False)
        per_batch: dict[int, dict[str, float]] = {}
        for res in results:
            row = per_batch.setdefault(res.workload.batch, {})
            row[res.model] = res.metric.median
            row[f"{res.model}_min"] = res.metric.min
            row["noise"] = max(row.get("noise", 0.0), res.metric.iqr_pct / 100.0)
        # Slower only if the medians and the fastest runs both say so, by more than the tolerance and the
        # runs' own spread (IQR): on a shared machine a single statistic flips with the neighbours' load.
        ratio = max(min(v["decomposed"] / v["dense"], v["decomposed_min"] / v["dense_min"])
                    for v in per_batch.values())
        allowance = max([tolerance] + [v["noise"] for v in per_batch.values()])
        live = [i for i, c in enumerate(choices) if c.form in ("three_factor", "two_factor")]
        rounds.append(GuardRound(round=r, ratio=ratio, per_batch=per_batch, factorized_targets=len(live),
                                 allowance=allowance))
        if ratio <= 1.0 + allowance or not live:
            break
        first = choices[live[0]].timings_us
        t_small = min(first) if first else 1
        live.sort(key=lambda i: choices[i].speedup_at(t_small) or 0.0)
        for i in live[: math.ceil(len(live) / 2)]:
            c = choices[i]
            merged = adapter.linear(c.layer, c.role).merge()
            adapter.replace(c.layer, c.role, merged)
            choices[i] = replace(c, form="dense", params_after=_params(merged),
                                 reason=f"merged by the end-to-end guard (decode was {ratio:.2f}x dense time in "
                                        f"round {r}; micro-benchmark: {c.reason})")
            rounds[-1].merged_after.append(c.name)
    return rounds

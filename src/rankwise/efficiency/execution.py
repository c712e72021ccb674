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
import json
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.checkpoint.format import is_factorized
from rankwise.errors import RankwiseError
from rankwise.fileio import write_text_atomic
from rankwise.layers.factorized import FactorizedLinear, FactorizedShape, Layout, relayout_
from rankwise.models.adapters import adapter_for
from rankwise.settings import cache_dir

FORMS = ("three_factor", "two_factor", "dense")
LAYOUTS: tuple[Layout, ...] = ("row", "col")
DEFAULT_TOKENS = (1, 8, 512)
CACHE_VERSION = 1
#: Attribute on a model holding the last :func:`choose_execution` report.
EXECUTION_ATTR = "_rankwise_execution"


# --- where results are cached ---------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(device: torch.device) -> str:
    """A stable name for the hardware: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(device: torch.device, dtype: torch.dtype, threads: int) -> str:
    """``<device type>-<hardware>-<dtype>-t<threads>``: timings depend on all four."""
    return f"{device.type}-{_slug(device_name(device))}-{str(dtype).removeprefix('torch.')}-t{threads}"


class TimingCache:
    """Micro-benchmark results of one device/dtype/threads key, as JSON (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, float]] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CACHE_VERSION and data.get("torch") == torch.__version__:
                self.entries = dict(data.get("entries", {}))
        except (OSError, ValueError, AttributeError):
            pass

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, threads: int) -> TimingCache:
        return cls(cache_dir() / "execution" / f"{cache_key(device, dtype, threads)}.json")

    def save(self) -> None:
        data = {"version": CACHE_VERSION, "torch": torch.__version__, "entries": self.entries}
        write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))


# --- micro-benchmarks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FormTiming:
    """Time per call of one form at one token count, in microseconds."""

    min_us: float
    median_us: float
    blocks: int


def shape_forms(shape: FactorizedShape) -> dict[str, FactorizedShape | None]:
    """The candidate forms of a factorized shape (``None`` stands for the dense Linear)."""
    forms: dict[str, FactorizedShape | None] = {}
    if shape.form == "three_factor":
        forms["three_factor"] = shape
    forms["two_factor"] = replace(shape, form="two_factor", rank_out=shape.rank_in)
    forms["dense"] = None
    return forms


def _entry_key(shape: FactorizedShape, form: str, tokens: int) -> str:
    s = shape
    return f"{s.out_features}x{s.in_features}:r{s.rank_out}x{s.rank_in}:{s.form}:b{int(s.bias)}:{form}@{tokens}"


def _build(shape: FactorizedShape, form_shape: FactorizedShape | None, dtype: torch.dtype,
           device: torch.device) -> nn.Module:
    if form_shape is None:
        return nn.Linear(shape.in_features, shape.out_features, bias=shape.bias, dtype=dtype, device=device)
    return FactorizedLinear(form_shape, dtype=dtype, device=device)


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or (32 << 20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forms(modules: dict[str, list[nn.Module]], x: torch.Tensor, device: torch.device, blocks: int = 7,
               min_block_s: float = 0.002) -> dict[str, FormTiming]:
    """Per-call time of each form on input ``x``, cycling through each form's copies, blocks interleaved."""
    calls: dict[str, int] = {}
    with torch.inference_mode():
        for form, copies in modules.items():
            for m in copies[:3]:
                m(x)
            _sync(device)
            t0 = time.perf_counter()
            for m in copies:
                m(x)
            _sync(device)
            per_call = max((time.perf_counter() - t0) / len(copies), 1e-7)
            calls[form] = max(len(copies), math.ceil(min_block_s / per_call))
        samples: dict[str, list[float]] = {form: [] for form in modules}
        for b in range(blocks):
            order = list(modules) if b % 2 == 0 else list(reversed(modules))
            for form in order:
                copies, n = modules[form], calls[form]
                _sync(device)
                t0 = time.perf_counter()
                for i in range(n):
                    copies[i % len(copies)](x)
                _sync(device)
                samples[form].append((time.perf_counter() - t0) / n * 1e6)
    return {form: FormTiming(min_us=min(s), median_us=sorted(s)[len(s) // 2], blocks=len(s))
            for form, s in samples.items()}


def _timed_candidates(builders: dict[str, Callable[[], nn.Module]], key: Callable[[str, int], str],
                      in_features: int, token_counts: Sequence[int], device: torch.device, dtype: torch.dtype,
                      cache: TimingCache | None, blocks: int, remeasure: bool) -> dict[int, dict[str, FormTiming]]:
    """Per-call timings of each candidate module at each token count (cached entries are not re-measured)."""
    out: dict[int, dict[str, FormTiming]] = {}
    missing = []
    for t in token_counts:
        entries = {c: cache.entries.get(key(c, t)) if cache else None for c in builders}
        if remeasure or any(e is None for e in entries.values()):
            missing.append(t)
        else:
            out[t] = {c: FormTiming(**e) for c, e in entries.items()}  # type: ignore[arg-type]
    if not missing:
        return out
    llc = _last_level_cache_bytes(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    modules: dict[str, list[nn.Module]] = {}
    for cand, build in builders.items():
        proto = build()
        nbytes = sum(p.numel() * p.element_size() for p in proto.parameters())
        copies = max(1, min(64, math.ceil(2 * llc / max(nbytes, 1))))
        modules[cand] = [proto] + [build() for _ in range(copies - 1)]
    for t in missing:
        x = torch.randn(1, t, in_features, generator=gen).to(device=device, dtype=dtype)
        out[t] = time_forms(modules, x, device, blocks=blocks)
        if cache is not None:
            for cand, timing in out[t].items():
                cache.entries[key(cand, t)] = asdict(timing)
    return dict(sorted(out.items()))


def _layout_suffix(layouts: dict[str, Layout] | None) -> str:
    if not layouts or all(v == "row" for v in layouts.values()):
        return ""
    return ":L" + "".join(f"{k[0]}{v[0]}" for k, v in sorted(layouts.items()))


def benchmark_shape(shape: FactorizedShape, token_counts: Sequence[int], device: torch.device,
                    dtype: torch.dtype, cache: TimingCache | None = None, blocks: int = 7,
                    remeasure: bool = False, layouts: dict[str, dict[str, Layout]] | None = None
                    ) -> dict[int, dict[str, FormTiming]]:
    """Timings of every candidate form of ``shape`` at each token count (from the cache when present).

    ``layouts`` (form -> factor -> layout) stores the factorized forms' factors as given; dense is always an
    ordinary ``nn.Linear`` (the baseline's own layout).
    """
    layouts = layouts or {}

    def builder(form: str, form_shape: FactorizedShape | None) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            module = _build(shape, form_shape, dtype, device)
            if isinstance(module, FactorizedLinear) and layouts.get(form):
                module.set_layouts(layouts[form])
            return module
        return build

    builders = {form: builder(form, fs) for form, fs in shape_forms(shape).items()}
    return _timed_candidates(builders, lambda f, t: _entry_key(shape, f, t) + _layout_suffix(layouts.get(f)),
                             shape.in_features, token_counts, device, dtype, cache, blocks, remeasure)


def benchmark_matrix(out_features: int, in_features: int, token_counts: Sequence[int], device: torch.device,
                     dtype: torch.dtype, cache: TimingCache | None = None, blocks: int = 7,
                     remeasure: bool = False) -> dict[int, dict[str, FormTiming]]:
    """Timings of one bias-free (out × in) matmul stored row-wise vs column-wise (see ``relayout_``)."""
    def builder(layout: Layout) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            linear = nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)
            relayout_(linear, layout)
            return linear
        return build

    return _timed_candidates({lay: builder(lay) for lay in LAYOUTS},
                             lambda lay, t: f"matrix:{out_features}x{in_features}:{lay}@{t}", in_features,
                             token_counts, device, dtype, cache, blocks, remeasure)


def choose_layout(timings: dict[int, dict[str, FormTiming]], margin: float = 0.03) -> Layout:
    """``col`` when it beats ``row`` by more than ``margin`` at some token count and is slower at none by more
    than the measurement resolves (the larger of ``margin`` and the blocks' median/min spread); else ``row``."""
    never_slower, faster = True, False
    for row in timings.values():
        ratio = row["col"].min_us / row["row"].min_us
        noise = max(row[lay].median_us / row[lay].min_us - 1.0 for lay in LAYOUTS)
        never_slower = never_slower and ratio <= 1.0 + max(margin, noise)
        faster = faster or ratio < 1.0 - margin
    return "col" if never_slower and faster else "row"


def shape_layouts(shape: FactorizedShape, token_counts: Sequence[int], device: torch.device, dtype: torch.dtype,
                  cache: TimingCache | None = None, blocks: int = 7, remeasure: bool = False,
                  margin: float = 0.03) -> dict[str, dict[str, Layout]]:
    """The measured best layout of every factor of every factorized candidate form of ``shape``.

    The forms share factor matrices (both forms of a Tucker shape have the same ``first``): each distinct
    matrix is measured once, also when no timing cache is used.
    """
    chosen: dict[tuple[int, int], Layout] = {}
    out: dict[str, dict[str, Layout]] = {}
    for form, fs in shape_forms(shape).items():
        if fs is None:
            continue
        out[form] = {}
        for name, (o, i) in fs.factor_shapes.items():
            if (o, i) not in chosen:
                timings = benchmark_matrix(o, i, token_counts, device, dtype, cache, blocks, remeasure)
                chosen[o, i] = choose_layout(timings, margin)
            out[form][name] = chosen[o, i]
    return out


def choose_form(timings: dict[int, dict[str, FormTiming]], margin: float = 0.03,
                params: dict[str, int] | None = None) -> tuple[str, dict[str, float], float]:
    """The form to execute: (form, worst-case time ratio to dense per form, the noise allowance used).

    Among the factorized forms, the one with the lowest worst-case ratio (over token counts) of its time to
    dense time wins, and among forms within ``margin`` of that, the one with the fewest ``params``. It is
    kept unless dense beats it somewhere by more than the larger of ``margin`` and the measurement's own
    noise there (median/min - 1 of the blocks). Within the noise the form with fewer bytes is kept: the
    end-to-end guard is what settles the whole model.
    """
    forms = [f for f in next(iter(timings.values())) if f != "dense"]
    scores = {f: max(timings[t][f].min_us / timings[t]["dense"].min_us for t in timings) for f in forms}
    scores["dense"] = 1.0
    if not forms:
        return "dense", scores, margin
    fastest = min(scores[f] for f in forms)
    close = [f for f in forms if scores[f] <= fastest * (1.0 + margin)]
    best = min(close, key=lambda f: ((params or {}).get(f, 0), scores[f], FORMS.index(f)))
    allowance = margin
    for row in timings.values():
        noise = max(row[f].median_us / row[f].min_us - 1.0 for f in (best, "dense"))
        allowance_t = max(margin, noise)
        allowance = max(allowance, allowance_t)
        if row[best].min_us / row["dense"].min_us > 1.0 + allowance_t:
            return "dense", scores, allowance_t
    return best, scores, allowance


def form_params(shape: FactorizedShape) -> dict[str, int]:
    """Parameters of each candidate form of ``shape``."""
    dense = shape.in_features * shape.out_features + (shape.out_features if shape.bias else 0)
    return {f: (s.params if s is not None else dense) for f, s in shape_forms(shape).items()}


# --- the report -----------------------------------------------------------------------------------------
@dataclass
class TargetChoice:
    """How one target executes now, and the measurements behind the choice."""

    layer: int
    role: str
    name: str
    shape: tuple[int, int]  # (out, in)
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
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["ranks"] = list(self.ranks) if self.ranks else None
        out["timings_us"] = {str(t): v for t, v in self.timings_us.items()}
        return out


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
    return sum(p.numel() for p in module.parameters())


def _kept_dense_reasons(model: nn.Module) -> dict[str, str]:
    """Reasons the decomposition left planned targets dense (break-even), from its attached report."""
    from rankwise.surgery import REPORT_ATTR

    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        return {}
    return {t.name: t.reason for t in report.targets if t.kept_dense}


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def _describe(form: str, scores: dict[str, float], timings: dict[int, dict[str, FormTiming]],
              allowance: float, layouts: dict[str, Layout] | None = None) -> str:
    if form == "dense":
        worst = ", ".join(f"{f} up to {s:.2f}x dense time" for f, s in scores.items() if f != "dense")
        return f"dense: faster beyond noise ({100 * allowance:.0f}%) ({worst})"
    speed = ", ".join(f"{timings[t]['dense'].min_us / timings[t][form].min_us:.2f}x@{t}" for t in timings)
    lay = "" if not layouts else "; layouts " + "/".join(f"{k}:{v}" for k, v in layouts.items())
    return f"{form}: {speed} vs dense (worst-case time ratio {scores[form]:.2f}; block noise up to " \
           f"{100 * allowance:.0f}%{lay})"


def choose_execution(model: nn.Module, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None, *, token_counts: Sequence[int] = DEFAULT_TOKENS,
                     guard: bool = False, reference: nn.Module | None = None, guard_batch_sizes: Sequence[int] = (1,),
                     guard_context: int = 64, guard_tokens: int = 8, guard_repeats: int = 5,
                     guard_tolerance: float = 0.02, blocks: int = 7, margin: float = 0.03,
                     remeasure: bool = False, layouts: bool = True,
                     use_cache: bool = True, progress: Callable[[int, int], None] | None = None
                     ) -> ExecutionReport:
    """Convert every factorized target of ``model`` in place to its fastest measured form; report why.

    ``device``/``dtype`` default to the model's own and must match it (timings are only valid there).
    ``guard=True`` also times end-to-end decode (batch sizes ``guard_batch_sizes``) against ``reference``
    (default: a deep copy with every factorized layer merged, which has the dense model's shapes) and merges
    the least useful factorized targets, half of the remaining ones per round, until the model is within
    ``guard_tolerance`` (or the runs' own spread, if larger) of dense or nothing factorized is left.
    ``layouts=True`` also picks, per factor, the faster of the row-major (out, in) and column-major storage
    by timing each factor's matrix shape (:func:`shape_layouts`); forms are then timed in those layouts.
    The report is also attached to the model as ``model._rankwise_execution`` (for savers and tools).
    """
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
    cache = TimingCache.for_device(dev, want, threads) if use_cache else None
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
        report.guard = decode_guard(model, choices, reference, dev, guard_batch_sizes, guard_context,
                                    guard_tokens, guard_repeats, guard_tolerance)
    report.params_after = _params(model)
    report.seconds = time.perf_counter() - t_start
    setattr(model, EXECUTION_ATTR, report)
    return report


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every factorized layer merged: the dense model's shapes (its speed, not its weights)."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if name and is_factorized(module):
            parent_name, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent_name) if parent_name else ref, attr, module.merge())
    return ref


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
        live = [c for c in choices if c.form in ("three_factor", "two_factor")]
        rounds.append(GuardRound(round=r, ratio=ratio, per_batch=per_batch, factorized_targets=len(live),
                                 allowance=allowance))
        if ratio <= 1.0 + allowance or not live:
            break
        t_small = min(live[0].timings_us) if live[0].timings_us else 1
        live.sort(key=lambda c: c.speedup_at(t_small) or 0.0)
        for c in live[: math.ceil(len(live) / 2)]:
            module = adapter.linear(c.layer, c.role)
            merged = module.merge()
            adapter.replace(c.layer, c.role, merged)
            c.form = "dense"
            c.reason = (f"merged by the end-to-end guard (decode was {ratio:.2f}x dense time in round {r}; "
                        f"micro-benchmark: {c.reason})")
            c.params_after = _params(merged)
            rounds[-1].merged_after.append(c.name)
    return rounds

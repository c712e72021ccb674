"""Micro-benchmarks of factorized shapes: each candidate form and each factor's memory layout, timed on the
actual device and cached per machine.

Protocol: each form's weights are replicated into enough copies to exceed twice the last-level cache and the
calls cycle through them, so weights stream from memory as they do inside a model (a single hot copy would
sit in cache and flatter the dense form). Calls are timed in blocks of at least 2 ms, forms interleaved block
by block; the fastest block per form is the estimate (on a shared machine other processes only ever add
time), the median gives the noise allowance. Results are cached as JSON under
``cache_dir()/execution/<device>-<dtype>-t<threads>.json`` so a shape is measured once per machine.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rankwise.fileio import write_text_atomic
from rankwise.layers.factorized import FactorizedLinear, FactorizedShape, Layout, relayout_
from rankwise.settings import cache_dir

FORMS = ("three_factor", "two_factor", "dense")
LAYOUTS: tuple[Layout, ...] = ("row", "col")
DEFAULT_TOKENS = (1, 8, 512)
CACHE_VERSION = 1


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

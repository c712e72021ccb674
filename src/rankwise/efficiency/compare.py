"""Dense vs decomposed side by side: static size and arithmetic, measured speed, the ideal and the gap.

:func:`compare` is what ``rankwise bench`` and ``bench/speedup.py`` run. Given models by name (one is the
baseline), it

1. accounts parameters and bytes (:mod:`.accounting`), FLOPs (:mod:`.flops`) and bytes per decode step
   (:mod:`.ideal`) of each;
2. measures prefill throughput, decode latency and scoring latency, interleaving the models
   (:mod:`.timing`), with peak memory (:mod:`.memory`) and energy where a counter exists (:mod:`.energy`);
3. puts each measured speedup next to its ideal (bytes-bound for decode, FLOPs-bound for full passes) and
   the share of it realized.

An optional *A/A control* measures the baseline a second time under another name: its "speedup" should be
1.00, and how far it strays is the noise of this machine at this moment.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.efficiency.accounting import ModelSize, model_size
from rankwise.efficiency.energy import find_counter
from rankwise.efficiency.flops import decode_flops, prefill_flops
from rankwise.efficiency.ideal import Ideal, decode_bytes, ideal_decode, ideal_prefill, realized
from rankwise.efficiency.timing import Workload, WorkloadResult, measure
from rankwise.models.forward import is_causal_lm

CONTROL = "A/A control"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Defaults are sized for a 2-core CPU (see ``rankwise bench --help``)."""

    seq_lens: tuple[int, ...] = (128, 512)
    batch_sizes: tuple[int, ...] = (1, 8)
    context: int = 128  # tokens in the KV cache before the timed decode steps
    decode_tokens: int = 16  # timed decode steps per run
    scoring: tuple[int, int] | None = (8, 256)  # (batch, seq_len) of the scoring-mode pass; None skips it
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    memory: bool = True
    energy: bool = True
    control: bool = False  # measure the baseline twice (A/A) to show the noise

    def workloads(self, causal: bool) -> list[Workload]:
        out = [Workload("prefill", batch=1, seq_len=s) for s in self.seq_lens]
        if causal:
            out += [Workload("decode", batch=b, seq_len=self.context, new_tokens=self.decode_tokens)
                    for b in self.batch_sizes]
        if self.scoring is not None:
            out.append(Workload("scoring", batch=self.scoring[0], seq_len=self.scoring[1]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"seq_lens": list(self.seq_lens), "batch_sizes": list(self.batch_sizes), "context": self.context,
                "decode_tokens": self.decode_tokens, "scoring": list(self.scoring) if self.scoring else None,
                "repeats": self.repeats, "warmup": self.warmup, "device": self.device, "memory": self.memory,
                "energy": self.energy, "control": self.control}


@dataclass
class Row:
    """One (model, workload) line: measured metric, speedup vs the baseline, its ideal and what is realized."""

    model: str
    result: WorkloadResult
    speedup: float | None
    ideal: Ideal | None
    paired_speedup: float | None = None  # median over repeats of baseline time / model time, run by run

    def to_dict(self) -> dict[str, Any]:
        ideal = self.ideal.speedup if self.ideal else None
        return {**self.result.to_dict(),
                "speedup_vs_baseline": self.speedup,
                "paired_speedup": self.paired_speedup,
                "ideal": self.ideal.to_dict() if self.ideal else None,
                **realized(self.speedup, ideal)}


@dataclass
class BenchResult:
    """Everything :func:`compare` found, printable as tables and serialisable as JSON."""

    baseline: str
    config: BenchConfig
    sizes: dict[str, ModelSize]
    static: dict[str, dict[str, Any]]
    rows: list[Row]
    energy_reason: str | None
    environment: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    decode_reason: str | None = None  # why decode workloads were not measured (None: they were)

    def row(self, model: str, workload: str) -> Row | None:
        return next((r for r in self.rows if r.model == model and r.result.workload.name == workload), None)

    def to_dict(self) -> dict[str, Any]:
        energy_measured = self.energy_reason is None
        return {
            "baseline": self.baseline,
            "config": self.config.to_dict(),
            "environment": self.environment,
            "protocol": {
                "timing": "median of repeats after warm-up, models interleaved (order alternating per repeat); "
                          "spread as min/max and IQR",
                "speedup": "baseline time / model time (prefill: tokens/s ratio)",
                "paired_speedup": "median over repeats of baseline time / model time of the same repeat "
                                  "(interleaved runs; cancels slow drift)",
                "ideal": "decode: bytes read per step (weights incl. whole LM head, embedding rows, KV cache); "
                         "prefill and scoring: FLOPs of the pass",
                "realized": "measured speedup / ideal speedup",
                "gain_realized": "(measured speedup - 1) / (ideal speedup - 1)",
                "memory": "peak during one run: process RSS on CPU (all loaded models included; see "
                          "increase_bytes), torch.cuda.max_memory_allocated on GPU",
                "flops": "matmuls only (linears, attention QK and AV over the full SxS square, LM head); "
                         "norms, activations, softmax, rotary, residuals excluded",
            },
            "energy": ({r.model + " | " + r.result.workload.name: r.result.energy.to_dict()
                        for r in self.rows if r.result.energy} if energy_measured else None),
            "energy_reason": self.energy_reason,
            "decode_reason": self.decode_reason,
            "models": {name: {"size": self.sizes[name].to_dict(), **self.static[name]} for name in self.sizes},
            "rows": [r.to_dict() for r in self.rows],
            **self.extra,
        }

    # --- rendering --------------------------------------------------------------------------------------
    def size_table(self) -> Any:
        from rich.table import Table

        base = self.sizes[self.baseline]
        table = Table(title="size and arithmetic (static; ratio to the baseline in brackets)")
        table.add_column("")
        for name in self.sizes:
            table.add_column(name, justify="right")

        def add(label: str, values: dict[str, float], fmt: Callable[[float], str], ratio: bool = True) -> None:
            b = values[self.baseline]
            cells = []
            for name in self.sizes:
                v = values[name]
                cells.append(fmt(v) + (f" ({v / b:.3f})" if ratio and name != self.baseline and b else ""))
            table.add_row(label, *cells)

        add("parameters", {n: s.params for n, s in self.sizes.items()}, _si)
        dtypes = ",".join(base.by_dtype)
        add(f"bytes ({dtypes})", {n: s.nbytes for n, s in self.sizes.items()}, format_bytes)
        add("decoder-linear parameters", {n: s.target_params for n, s in self.sizes.items()}, _si)
        tied = " (tied to embeddings, counted once)" if base.tied_embeddings else ""
        add(f"LM head parameters{tied}", {n: s.lm_head["params"] for n, s in self.sizes.items()}, _si, False)
        for key, label, fmt in (("decode_bytes_b1", "bytes read / decode step, b=1", format_bytes),
                                ("decode_flops_b1", "FLOPs / decode step, b=1", _si)):
            add(label, {n: self.static[n][key] for n in self.sizes}, fmt)
        for s in self.config.seq_lens:
            add(f"FLOPs / token, prefill s={s}", {n: self.static[n]["prefill_flops_per_token"][str(s)]
                                                  for n in self.sizes}, _si)
        return table

    def speed_table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"measured on {self.environment['device']} ({self.environment['threads']} threads, "
                            f"{self.environment['dtype']}): median of {self.config.repeats} after "
                            f"{self.config.warmup} warm-up, interleaved")
        for col, just in (("workload", "left"), ("model", "left"), ("median", "right"), ("min-max", "right"),
                          ("speedup", "right"), ("ideal", "right"), ("realized", "right"),
                          ("peak mem +", "right"), ("energy", "right")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for r in self.rows:
            m, w = r.result.metric, r.result.workload
            ideal = r.ideal.speedup if r.ideal else None
            real = realized(r.speedup, ideal)
            energy = "n/a" if r.result.energy is None else f"{r.result.energy.per_token * 1e3:.2f} mJ/tok"
            table.add_row(
                w.name, r.model, f"{m.median:.2f} {w.unit}", f"{m.min:.2f}-{m.max:.2f}",
                "-" if r.speedup is None else f"{r.speedup:.3f}x",
                "-" if ideal is None else f"{ideal:.3f}x {r.ideal.bound}",  # type: ignore[union-attr]
                "-" if real["realized"] is None else f"{100 * real['realized']:.0f}%",
                "-" if r.result.memory is None else format_bytes(r.result.memory.increase_bytes),
                energy)
        table.caption = ("speedup = baseline time / model time; ideal = bytes-bound (decode) or FLOPs-bound "
                         "(full passes); realized = speedup / ideal. IQR and gain realized are in the JSON.")
        return table


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_bytes(x: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (one decimal), e.g. 513.1 MiB."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(x) >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def static_numbers(model: nn.Module, config: BenchConfig) -> dict[str, Any]:
    """FLOPs and decode bytes of one model for the configured workloads."""
    out: dict[str, Any] = {
        "prefill_flops_per_token": {str(s): prefill_flops(model, s, 1, "last").per_token for s in config.seq_lens},
        "prefill_flops": {str(s): prefill_flops(model, s, 1, "last").to_dict() for s in config.seq_lens},
    }
    if is_causal_lm(model):
        ctx = config.context + config.decode_tokens // 2
        out["decode_context_for_ideal"] = ctx
        out["decode_bytes"] = {str(b): decode_bytes(model, ctx, b).to_dict() for b in config.batch_sizes}
        out["decode_flops"] = {str(b): decode_flops(model, ctx, b).to_dict() for b in config.batch_sizes}
        out["decode_bytes_b1"] = decode_bytes(model, ctx, 1).total
        out["decode_flops_b1"] = decode_flops(model, ctx, 1).total
    else:
        out["decode_bytes_b1"] = out["decode_flops_b1"] = 0
    return out


def _ideal_for(dense: nn.Module, model: nn.Module, w: Workload, config: BenchConfig) -> Ideal:
    if w.kind == "decode":
        return ideal_decode(dense, model, config.context + config.decode_tokens // 2, w.batch)
    return ideal_prefill(dense, model, w.seq_len, w.batch, logits="last" if w.kind == "prefill" else "all")


def environment(device: str) -> dict[str, Any]:
    from rankwise.efficiency.execution import device_name

    dev = torch.device(device)
    return {"device": f"{dev.type}: {device_name(dev)}", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu_run": dev.type == "cuda"}


def compare(models: Mapping[str, nn.Module], baseline: str, config: BenchConfig = BenchConfig(),
            progress: Callable[[int, int, str], None] | None = None) -> BenchResult:
    """Account and measure ``models`` (by display name) against ``models[baseline]`` (module docstring)."""
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models ({', '.join(models)})")
    names = list(models)
    dense = models[baseline]
    sizes = {n: model_size(models[n]) for n in names}
    static = {n: static_numbers(models[n], config) for n in names}
    not_causal = [n for n, m in models.items() if not is_causal_lm(m)]
    causal = not not_causal
    decode_reason = (None if causal else
                     f"no decode workload: {', '.join(not_causal)} has no LM head taking a KV cache "
                     f"({type(models[not_causal[0]]).__name__})")
    counter, reason = find_counter(config.device) if config.energy else (None, "energy measurement switched off")
    timed: dict[str, nn.Module] = dict(models)
    if config.control:
        timed = {baseline: dense, f"{baseline} ({CONTROL})": dense,
                 **{n: m for n, m in models.items() if n != baseline}}
    results = measure(timed, config.workloads(causal), repeats=config.repeats, warmup=config.warmup,
                      device=config.device, counter=counter, memory=config.memory, progress=progress)
    base = {r.workload.name: r for r in results if r.model == baseline}
    rows = []
    for r in results:
        b = base[r.workload.name].metric.median
        speedup = (r.metric.median / b) if r.workload.higher_is_better else (b / r.metric.median)
        ideal = None if r.model == baseline else _ideal_for(dense, timed[r.model], r.workload, config)
        rows.append(Row(model=r.model, result=r, speedup=speedup, ideal=ideal,
                        paired_speedup=paired_speedup(base[r.workload.name].samples, r.samples)))
    env = environment(config.device)
    env["dtype"] = str(next(dense.parameters()).dtype).removeprefix("torch.")
    return BenchResult(baseline=baseline, config=config, sizes=sizes, static=static, rows=rows,
                       energy_reason=None if counter is not None else reason, environment=env,
                       decode_reason=decode_reason)


def paired_speedup(baseline_seconds: Sequence[float], model_seconds: Sequence[float]) -> float | None:
    """Median of the per-repeat time ratios baseline / model.

    Repeats are interleaved (:func:`~rankwise.efficiency.timing.measure`), so repeat i of both models ran
    seconds apart under the same machine state; the ratio within a pair cancels slow drift (neighbours' load,
    CPU migration) that the ratio of the two medians does not. Reported next to it, not instead of it.
    """
    pairs = [b / m for b, m in zip(baseline_seconds, model_seconds, strict=False) if m > 0]
    return statistics.median(pairs) if pairs else None

"""Measured latency and throughput: prefill, decode with a KV cache, and the paper's scoring mode.

Protocol (every number printed carries it):

* each workload is run ``warmup`` times untimed, then ``repeats`` times; we report the **median** with
  the min/max and the interquartile range of the repeats;
* models compared in one run are **interleaved**: repeat 1 runs every model, then repeat 2 in the reverse
  order, and so on, so drift on a shared machine (other processes, thermal state) hits all models alike;
* only the workload itself is timed: inputs, the prefilled KV cache of a decode run, and energy-counter
  reads happen outside the timed region; on CUDA the device is synchronized at both ends;
* inputs are fixed pseudo-random token ids (seeded): the arithmetic of a dense or factorized model does
  not depend on the token values.

Workloads:

* ``prefill``: one forward pass over ``batch x seq_len`` tokens with a fresh KV cache, logits for the
  last position only (what generation's prefill does) → tokens/s;
* ``decode``: ``new_tokens`` single-token steps with a KV cache after a prefilled context of ``seq_len``
  tokens, feeding fixed ids (no sampling) → ms per step (each step makes one token per sequence);
* ``scoring``: the paper's latency per batch: a forward pass over ``batch x seq_len`` tokens with logits at
  every position and the log-softmax lm-eval takes over them, as a log-likelihood evaluation does → ms/batch.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from rankwise.efficiency.energy import EnergyCounter, EnergyTally
from rankwise.efficiency.memory import MemoryResult, PeakMemory
from rankwise.errors import RankwiseError
from rankwise.models.forward import cache_kwargs, forward_caps, is_causal_lm

Kind = Literal["prefill", "decode", "scoring"]


@dataclass(frozen=True)
class Stats:
    """Median and spread of repeated measurements."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        xs = sorted(float(x) for x in samples)
        if not xs:
            raise ValueError("no samples")
        if len(xs) >= 2:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            q1 = q3 = xs[0]
        return cls(median=statistics.median(xs), q1=q1, q3=q3, min=xs[0], max=xs[-1], n=len(xs))

    @property
    def iqr_pct(self) -> float:
        """Interquartile range relative to the median, in percent: the noise of this measurement."""
        return 100.0 * (self.q3 - self.q1) / self.median if self.median else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_pct": self.iqr_pct}


@dataclass(frozen=True)
class Workload:
    """One thing to time; see the module docstring for what each kind means."""

    kind: Kind
    batch: int
    seq_len: int  # prefill/scoring: tokens per sequence; decode: tokens already in the cache
    new_tokens: int = 0  # decode: timed steps per run

    @property
    def name(self) -> str:
        if self.kind == "decode":
            return f"decode b={self.batch} ctx={self.seq_len}"
        return f"{self.kind} b={self.batch} s={self.seq_len}"

    @property
    def tokens_per_run(self) -> int:
        return self.batch * (self.new_tokens if self.kind == "decode" else self.seq_len)

    @property
    def unit(self) -> str:
        return {"prefill": "tokens/s", "decode": "ms/token", "scoring": "ms/batch"}[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "prefill"

    def metric(self, seconds: float) -> float:
        """The reported value of one run lasting ``seconds``."""
        if self.kind == "prefill":
            return self.tokens_per_run / seconds
        if self.kind == "decode":
            return 1e3 * seconds / self.new_tokens
        return 1e3 * seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "unit": self.unit}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    """A prepared workload on one model: ``setup()`` (untimed) returns the state ``timed(state)`` consumes."""

    setup: Callable[[], Any]
    timed: Callable[[Any], None]


def prepare(model: nn.Module, workload: Workload, device: torch.device, seed: int = 0) -> Runner:
    """Inputs (and, for decode, the prefilled cache) for ``workload`` on ``model``."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(seed)
    b, s = workload.batch, workload.seq_len
    ids = torch.randint(0, vocab, (b, s), generator=gen).to(device)
    last_only = {"logits_to_keep": 1} if forward_caps(model).logits_to_keep else {}

    causal = is_causal_lm(model)
    if workload.kind == "prefill":
        def prefill(_: Any) -> None:
            with torch.inference_mode():
                if causal:
                    from transformers import DynamicCache

                    model(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **last_only)
                else:
                    model(ids)
        return Runner(setup=lambda: None, timed=prefill)

    if workload.kind == "scoring":
        def score(_: Any) -> None:
            with torch.inference_mode():
                if not causal:
                    model(ids)
                    return
                logits = model(ids, use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)  # lm-eval: log_softmax over the whole batch
                logp[:, :-1].gather(-1, ids[:, 1:, None]).sum()
        return Runner(setup=lambda: None, timed=score)

    if not causal:
        raise RankwiseError(f"{type(model).__name__} is not a causal LM with a KV cache: no decode workload")
    from transformers import DynamicCache

    steps = torch.randint(0, vocab, (b, workload.new_tokens), generator=gen).to(device)
    cache0 = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache0), **last_only)

    def decode(cache: Any) -> None:
        with torch.inference_mode():
            for i in range(workload.new_tokens):
                model(steps[:, i:i + 1], **cache_kwargs(model, cache))
    return Runner(setup=lambda: copy.deepcopy(cache0), timed=decode)


def time_once(runner: Runner, device: torch.device, counter: EnergyCounter | None = None
              ) -> tuple[float, float | None]:
    """Seconds (and joules, when a counter is given) of one timed run; setup is outside both."""
    state = runner.setup()
    synchronize(device)
    e0 = counter.read() if counter is not None else None
    t0 = time.perf_counter()
    runner.timed(state)
    synchronize(device)
    seconds = time.perf_counter() - t0
    joules = counter.joules(e0, counter.read()) if counter is not None else None
    return seconds, joules


@dataclass
class WorkloadResult:
    """One model on one workload: time per run, the reported metric, peak memory, energy."""

    model: str
    workload: Workload
    seconds: Stats
    metric: Stats
    memory: MemoryResult | None = None
    energy: EnergyTally | None = None
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "workload": self.workload.to_dict(),
            "seconds_per_run": self.seconds.to_dict(),
            "metric": {"unit": self.workload.unit, **self.metric.to_dict()},
            "memory": self.memory.to_dict() if self.memory else None,
            "energy": self.energy.to_dict() if self.energy else None,
            "samples_seconds": self.samples,
        }


def measure(models: Mapping[str, nn.Module], workloads: Sequence[Workload], repeats: int = 5, warmup: int = 1,
            device: str | torch.device = "cpu", counter: EnergyCounter | None = None, memory: bool = True,
            progress: Callable[[int, int, str], None] | None = None, seed: int = 0) -> list[WorkloadResult]:
    """Time every model on every workload, interleaved (module docstring); one result per (model, workload)."""
    if repeats < 1:
        raise RankwiseError(f"repeats must be at least 1, not {repeats}")
    dev = torch.device(device)
    names = list(models)
    total = len(workloads) * len(names) * (warmup + repeats + (1 if memory else 0))
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    results: list[WorkloadResult] = []
    for w in workloads:
        runners = {n: prepare(models[n], w, dev, seed) for n in names}
        for _ in range(warmup):
            for n in names:
                time_once(runners[n], dev)
                tick(f"{w.name} warm-up")
        peaks: dict[str, MemoryResult | None] = dict.fromkeys(names)
        if memory:
            for n in names:
                state = runners[n].setup()
                with PeakMemory(dev) as pm:
                    runners[n].timed(state)
                peaks[n] = pm.result
                del state
                tick(f"{w.name} memory")
        samples: dict[str, list[float]] = {n: [] for n in names}
        tallies = {n: EnergyTally(counter=counter.name, scope=counter.scope) for n in names} if counter else {}
        for r in range(repeats):
            for n in names if r % 2 == 0 else reversed(names):
                seconds, joules = time_once(runners[n], dev, counter)
                samples[n].append(seconds)
                if counter is not None and joules is not None:
                    tallies[n].add(joules, w.tokens_per_run)
                tick(f"{w.name} {n}")
        for n in names:
            results.append(WorkloadResult(
                model=n, workload=w, seconds=Stats.of(samples[n]),
                metric=Stats.of([w.metric(s) for s in samples[n]]), memory=peaks[n],
                energy=tallies.get(n), samples=samples[n]))
        del runners
    return results

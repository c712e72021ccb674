"""Sensitivity profiling: how much each target alone hurts the model when it is decomposed at a few ranks.

For every target t and a few kept fractions (default 0.4 and 0.7 of its parameters) the profile measures a
cheap proxy loss with *only t* decomposed by the chosen method: the KL divergence from the dense model's
next-token distribution to the decomposed model's, in nats per token, averaged over every position of a
few calibration sequences (default 2 x 128 tokens of WikiText-2 validation, seed 1, a different draw from
the statistics' seed-0 windows). Next to it, for every rank, it stores the cheap
reconstruction error in the method's own metric (the whitened error ‖(W − Ŵ)S‖²/‖WS‖² for SVD-LLM, the
plain ‖W − Ŵ‖²/‖W‖² for SVD/Tucker), computed from one spectrum per target.

:meth:`SensitivityProfile.predict` turns the two into a predicted loss at *any* rank: the measured KLs are
interpolated piecewise-linearly against the squared error (with (0, 0) for the dense matrix, made
monotone, extrapolated along the last segment), since to first order a small output perturbation costs
KL proportional to its energy. That is what the greedy, knapsack and target allocators minimize.

Cost: a target in layer l only changes layers l..L-1, so the block inputs of the dense model are captured
once and each measurement runs the model from layer l on (the earlier blocks are swapped for a pass-through
and block l's input is injected by a pre-hook, which works for any architecture the adapter knows). On
SmolLM2-135M that halves the work on average. Profiles are cached on disk
(``$RANKWISE_CACHE/sensitivity/<key>.json``), keyed by the model's content hash, the method, the
statistics' calibration settings and the profile settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.allocation.budget import Target, TargetSize
from rankwise.calibration.cache import model_fingerprint
from rankwise.calibration.data import CalibrationConfig, calibration_ids
from rankwise.decomposition import get_method
from rankwise.decomposition.base import CalibrationStats
from rankwise.design.ranks import fraction_rank
from rankwise.errors import PlanError
from rankwise.fileio import write_json_atomic
from rankwise.models.adapters import ArchitectureAdapter, adapter_for
from rankwise.settings import cache_dir

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile measures; every field is part of the cache key."""

    method: str = "svd-llm"
    fractions: tuple[float, ...] = (0.4, 0.7)  # kept fractions of each target's parameters measured
    n_samples: int = 2  # proxy sequences
    seq_len: int = 128
    seed: int = 1
    dataset: str = "wikitext2"

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 < f < 1.0 for f in self.fractions):
            raise PlanError(f"profile fractions {self.fractions}: each must be in (0, 1)")
        if self.n_samples < 1 or self.seq_len < 2:
            raise PlanError("profile: need at least 1 sequence of at least 2 tokens")


@dataclass
class TargetProfile:
    """One target's measurements: ranks, their proxy losses, and the error in the method's metric per rank."""

    layer: int
    role: str
    m: int
    n: int
    ranks: list[int]
    kl: list[float]  # proxy loss at each measured rank (nats/token)
    tail: list[float]  # tail[r] = squared relative error at rank r (method's metric), r = 0..min(m, n)

    def err2(self, rank: int | None) -> float:
        if rank is None:
            return 0.0
        return float(self.tail[min(max(rank, 0), len(self.tail) - 1)])

    def predict(self, rank: int | None) -> float:
        """Predicted proxy loss at ``rank`` (None = dense = 0): monotone piecewise-linear in err², see module."""
        if rank is None:
            return 0.0
        x = self.err2(rank)
        pts = sorted(zip((self.err2(r) for r in self.ranks), self.kl, strict=True))
        xs, ys = [0.0], [0.0]
        for px, py in pts:
            if px <= xs[-1]:
                ys[-1] = max(ys[-1], py)
                continue
            xs.append(px)
            ys.append(max(py, ys[-1]))
        for i in range(1, len(xs)):
            if x <= xs[i]:
                t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        if len(xs) == 1:
            return 0.0
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(slope, 0.0) * (x - xs[-1])


@dataclass
class SensitivityProfile:
    """Per-target profiles plus the settings and reference numbers they were measured with."""

    model: str
    settings: ProfileSettings
    targets: list[TargetProfile]
    dense_nll: float  # the dense model's mean NLL on the proxy sequences (nats/token), for context
    seconds: float
    block_influence: list[float] = field(default_factory=list)  # 1 − cos(in, out) per block (layer removal)
    cache_hit: bool = False
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def by_target(self) -> dict[Target, TargetProfile]:
        return {(t.layer, t.role): t for t in self.targets}

    def predictor(self) -> Callable[[Target, int | None], float]:
        table = self.by_target()
        return lambda key, rank: table[key].predict(rank)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "model": self.model, "settings": asdict(self.settings),
                "dense_nll": self.dense_nll, "seconds": self.seconds, "key": self.key, "meta": self.meta,
                "block_influence": self.block_influence,
                "targets": [asdict(t) for t in self.targets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityProfile:
        s = dict(data["settings"])
        s["fractions"] = tuple(s["fractions"])
        return cls(model=data["model"], settings=ProfileSettings(**s),
                   targets=[TargetProfile(**t) for t in data["targets"]], dense_nll=float(data["dense_nll"]),
                   seconds=float(data["seconds"]), key=str(data.get("key", "")), meta=dict(data.get("meta", {})),
                   block_influence=[float(x) for x in data.get("block_influence", [])])


# --- running the model from one layer on ------------------------------------------------------------------------
class _PassThrough(nn.Module):
    """Stands in for a block that must not run: returns its hidden-state input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class TailRunner:
    """Runs a model on fixed inputs from any block on, reusing the dense model's block inputs.

    ``block_inputs[l]`` is the hidden state entering block l in the dense model; :meth:`logits_from`
    replaces blocks 0..l-1 by pass-throughs and injects ``block_inputs[l]`` into block l, so the result
    equals a full forward whenever blocks 0..l-1 are unchanged.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, input_ids: torch.Tensor) -> None:
        self.model, self.adapter = model, adapter
        self.input_ids = input_ids.to(next(model.parameters()).device)
        stack = model.get_submodule(adapter.blocks_path)
        # layer l is entry l of one ModuleList for decoder-only and encoder-only models; several stacks
        # (encoder-decoder) are run whole, from the first layer
        self.single = len(adapter.stacks) == 1 and isinstance(stack, nn.ModuleList)
        self.blocks: nn.ModuleList = stack if self.single else nn.ModuleList()
        captured: dict[int, torch.Tensor] = {}
        handles = []
        if self.single and len(self.blocks):
            def grab_out(module: nn.Module, args: tuple, output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                captured[len(self.blocks)] = out.detach().clone()
            handles.append(self.blocks[-1].register_forward_hook(grab_out))
        for i, block in enumerate(self.blocks):
            def grab(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                captured[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            self.dense_logits = self._forward()
        finally:
            for h in handles:
                h.remove()
        #: hidden state entering block l; entry L is the last block's output
        self.block_inputs = [captured[i] for i in range(len(self.blocks) + 1)] if self.single else []

    def block_influence(self) -> list[float]:
        """ShortGPT's Block Influence per block: 1 − mean cosine(input, output) over tokens. Low = removable."""
        out = []
        for i in range(len(self.block_inputs) - 1):
            a, b = self.block_inputs[i].float(), self.block_inputs[i + 1].float()
            out.append(float(1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))
        return out

    def _forward(self) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=self.input_ids, use_cache=False)
        return out.logits

    def logits_from(self, layer: int) -> torch.Tensor:
        if not self.single:
            return self._forward()
        saved = [self.blocks[i] for i in range(layer)]
        inject = self.block_inputs[layer]

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (inject, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inject}

        handle = self.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            for i in range(layer):
                self.blocks[i] = _PassThrough()
            return self._forward()
        finally:
            handle.remove()
            for i, block in enumerate(saved):
                self.blocks[i] = block


def mean_kl(ref_logp: torch.Tensor, logits: torch.Tensor, chunk: int = 256) -> float:
    """Mean over positions of KL(p_ref ‖ p), nats; both (batch, seq, vocab), ``chunk`` rows at a time."""
    ref = ref_logp.reshape(-1, ref_logp.shape[-1])
    cur = logits.reshape(-1, logits.shape[-1])
    total = 0.0
    for s in range(0, ref.shape[0], chunk):
        r = ref[s : s + chunk]
        q = torch.log_softmax(cur[s : s + chunk].float(), dim=-1)
        total += float((r.exp() * (r - q)).sum())
    return total / ref.shape[0]


def mean_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return float(-logp.gather(-1, input_ids[:, 1:, None].to(logp.device)).mean())


# --- the profile -------------------------------------------------------------------------------------------------
def profile_key(fingerprint: str, settings: ProfileSettings, calib: Mapping[str, Any] | None) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"v": FORMAT_VERSION, "model": fingerprint, "settings": asdict(settings),
                         "calibration": dict(calib or {})}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def profile_path(key: str) -> Path:
    return cache_dir() / "sensitivity" / f"{key}.json"


def tail_energy(spectrum: torch.Tensor) -> list[float]:
    """tail[r] = Σ_{i>r} σ_i² / Σ σ_i² for r = 0..k (the squared relative error of the rank-r truncation)."""
    sq = spectrum.to(torch.float64).clamp_min(0) ** 2
    total = float(sq.sum())
    if total <= 0.0:
        return [0.0] * (sq.numel() + 1)
    csum = torch.cumsum(sq, 0)
    return [1.0] + [max(0.0, 1.0 - float(c) / total) for c in csum]


def proxy_ids(tokenizer: Any, settings: ProfileSettings, data_dir: str | None = None) -> torch.Tensor:
    """The proxy sequences (n_samples × seq_len token ids) the profile measures KL on."""
    proxy = CalibrationConfig(dataset=settings.dataset, n_samples=settings.n_samples, seq_len=settings.seq_len,
                              seed=settings.seed, data_dir=data_dir)
    return calibration_ids(tokenizer, proxy)


@contextlib.contextmanager
def _bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    from rankwise.evaluation.progress import task_progress

    with task_progress(label, total, enabled) as advance:
        yield advance


def profile(model: nn.Module, tokenizer: Any, settings: ProfileSettings | None = None, *,
            calibration: CalibrationConfig | None = None, stats: Mapping[str, CalibrationStats] | None = None,
            use_cache: bool = True, progress: bool = True, name: str = "", form: str = "two_factor",
            ) -> SensitivityProfile:
    """Measure (or load from the cache) the sensitivity profile of every target of ``model``.

    ``stats`` are the calibration statistics of the method (collected with ``calibration`` when absent and
    the method needs them). The model is left exactly as it was (each target's weight is restored).
    """
    settings = settings or ProfileSettings()
    method = get_method(settings.method)
    calibration = calibration or CalibrationConfig()
    adapter = adapter_for(model)
    calib_desc = calibration.describe() if method.needs else None
    key = profile_key(model_fingerprint(model), settings, calib_desc)
    path = profile_path(key)
    if use_cache and path.is_file():
        try:
            prof = SensitivityProfile.from_dict(json.loads(path.read_text()))
            prof.cache_hit, prof.key = True, key
            return prof
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable entry is recomputed and overwritten
    t0 = time.perf_counter()
    infos = adapter.targets()
    if method.needs and stats is None:
        from rankwise.decomposition.apply import gather_stats

        request = {t.name: frozenset(method.needs) | {"gram"} for t in infos}  # as surgery asks: one cache entry
        stats, _, _ = gather_stats(model, request, calibration, tokenizer, use_cache, progress)
    ids = proxy_ids(tokenizer, settings, calibration.data_dir)
    runner = TailRunner(model, adapter, ids)
    ref = torch.log_softmax(runner.dense_logits.float(), dim=-1)
    dense_nll = mean_nll(runner.dense_logits, ids)
    influence = runner.block_influence()
    del runner.dense_logits
    out: list[TargetProfile] = []
    with _bar(progress, "sensitivity", len(infos) * len(settings.fractions)) as advance:
        for info in infos:
            weight = adapter.weight(info.layer, info.role)  # (out, in); a view of a Conv1D's (in, out) weight
            st = stats.get(info.name) if stats is not None else None
            original = weight.detach().clone()
            size = TargetSize(info.layer, info.role, info.out_features, info.in_features, form)
            tail = tail_energy(method.singular_values(original, st))
            ranks = sorted({max(1, min(size.max_rank or 1, fraction_rank(f, size.m, size.n, form)))  # type: ignore[arg-type]
                            for f in settings.fractions})
            kls = []
            try:
                for r in ranks:
                    approx = method.decompose(original, r, st).factors.reconstruct()
                    with torch.no_grad():
                        weight.copy_(approx.to(weight.dtype))
                    kls.append(max(0.0, mean_kl(ref, runner.logits_from(info.layer))))
                    advance(len(settings.fractions) / len(ranks))
            finally:
                with torch.no_grad():
                    weight.copy_(original)
            out.append(TargetProfile(info.layer, info.role, info.out_features, info.in_features, ranks, kls, tail))
    prof = SensitivityProfile(model=name, settings=settings, targets=out, dense_nll=dense_nll,
                              seconds=time.perf_counter() - t0, key=key, block_influence=influence,
                              meta={"proxy": "mean KL(dense || decomposed) over next-token distributions, nats/token",
                                    "proxy_tokens": int(ids.numel()), "error_metric": method.name,
                                    "calibration": calib_desc})
    if use_cache:
        write_json_atomic(path, prof.to_dict())
    return prof

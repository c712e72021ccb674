"""Per-Linear calibration statistics, collected in one pass over the calibration windows.

Forward hooks on the targeted ``nn.Linear`` modules see each input x (tokens × n) and accumulate what the
data-aware methods read (:class:`CalibrationStats`, defined here):

* ``gram`` = XᵀX (SVD-LLM's whitening), each batch's product in float32 and the running sum in float64,
  so thousands of tokens do not lose precision while the n×n product stays fast;
* ``act_abs_mean`` = mean |x| and ``act_sq_mean`` = mean x² per input channel (ASVD's scaling);
* ``fisher`` = Σ over sequences of (∂ loss / ∂W)², the squared gradients of the LM loss (FWSVD), from a
  backward pass with ``requires_grad`` on the targeted weights only, so no other gradient is stored.

Only the targets whose method needs a statistic get hooks, and only for the fields they need. Modules that
read the very same input tensor (q, k, v of one block; gate and up) share one accumulator: the Gram is
computed once for them, not three times. Hooks return None (a returned value would replace the module's
output) and hold no tensor past the forward that produced it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.errors import DataError
from rankwise.models.forward import forward_caps, is_causal_lm

ACTIVATION_FIELDS = frozenset({"gram", "act_abs_mean", "act_sq_mean"})
GRADIENT_FIELDS = frozenset({"fisher"})
KNOWN_FIELDS = ACTIVATION_FIELDS | GRADIENT_FIELDS

#: module name -> the CalibrationStats fields its method needs.
StatsRequest = Mapping[str, frozenset[str]]
Progress = Callable[[int, int], None]


@dataclass
class CalibrationStats:
    """Per-Linear statistics over calibration inputs x (tokens × n), filled by :mod:`rankwise.calibration`."""

    gram: torch.Tensor | None = None  # XᵀX summed over tokens, (n, n), float64 or float32
    act_abs_mean: torch.Tensor | None = None  # mean |x| per input channel, (n,)
    act_sq_mean: torch.Tensor | None = None  # mean x² per input channel, (n,)
    fisher: torch.Tensor | None = None  # accumulated squared gradients of W, (m, n)
    n_tokens: int = 0


@dataclass(eq=False)
class _InputAccumulator:
    """Running sums over the inputs one or more modules receive."""

    fields: frozenset[str]
    members: list[str] = field(default_factory=list)
    gram: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    n_tokens: int = 0
    last: torch.Tensor | None = None  # the input added during the current forward (cleared after it)

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if "gram" in self.fields:
            g = (x2.T @ x2).to(torch.float64)
            self.gram = g if self.gram is None else self.gram.add_(g)
        if "act_abs_mean" in self.fields:
            s = x2.abs().sum(0, dtype=torch.float64)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        if "act_sq_mean" in self.fields:
            s = x2.square().sum(0, dtype=torch.float64)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
        self.n_tokens += int(x2.shape[0])


class _StopForward(Exception):
    """Raised by a hook once every hooked module has seen this forward's input: the rest is not needed."""


class _Collector:
    """Owns the hooks and accumulators for one collection pass.

    Early exit: the first forward runs to the end and records how often each hooked module is called. If
    each is called exactly once, later forwards stop (by raising :class:`_StopForward` from the last hook)
    as soon as all of them have fired: calibrating layers 0-5 of a 30-layer model costs 6 layers, not 30.
    Not with Fisher information, which needs the loss at the end of the model.
    """

    def __init__(self, model: nn.Module, request: StatsRequest) -> None:
        self.model = model
        self.request = {name: frozenset(fields) & ACTIVATION_FIELDS for name, fields in request.items()}
        self.fisher_names = [name for name, fields in request.items() if "fisher" in fields]
        self.accs: dict[str, _InputAccumulator] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self._recent: tuple[torch.Tensor, _InputAccumulator] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, int] = {}  # hooked module -> calls in the current forward
        self.can_stop_early = False  # decided after the first forward
        self.forwards = 0

    # --- hooks ------------------------------------------------------------------------------------------
    def attach(self) -> None:
        for name, fields in self.request.items():
            if fields:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forwards = max(self.forwards, 1)
        self.end_forward()

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._observe(name, args[0])
            self._calls[name] = self._calls.get(name, 0) + 1
            if self.can_stop_early and len(self._calls) == len(self._handles):
                raise _StopForward
            return None

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        acc = self.accs.get(name)
        if acc is None:  # first forward: share the accumulator of a module that just read this same tensor
            recent = self._recent
            if recent is not None and recent[0] is x and self.request[name] <= recent[1].fields:
                acc = recent[1]
            else:
                acc = _InputAccumulator(fields=self.request[name])
            acc.members.append(name)
            self.accs[name] = acc
        if acc.last is x:
            return  # a module sharing this input already added it in this forward
        if acc.last is not None and len(acc.members) > 1:
            raise RuntimeError(f"calibration: modules {acc.members} stopped sharing one input tensor")
        acc.add(x)
        acc.last = x
        self._recent = (x, acc)

    def end_forward(self) -> None:
        """Drop the references to this forward's activations; after the first, decide on early exits."""
        if self.forwards == 0 and not self.fisher_names:
            self.can_stop_early = len(self._calls) == len(self._handles) and all(
                n == 1 for n in self._calls.values())
        self.forwards += 1
        self._calls.clear()
        for acc in self.accs.values():
            acc.last = None
        self._recent = None

    # --- gradients --------------------------------------------------------------------------------------
    def add_fisher(self) -> None:
        for name in self.fisher_names:
            weight = self.model.get_submodule(name).weight
            if weight.grad is None:
                continue
            sq = weight.grad.detach().to(torch.float32).square()
            self.fisher[name] = sq if name not in self.fisher else self.fisher[name].add_(sq)
            weight.grad = None

    # --- result -----------------------------------------------------------------------------------------
    def results(self, request: StatsRequest) -> dict[str, CalibrationStats]:
        out: dict[str, CalibrationStats] = {}
        means: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for name, fields in request.items():
            stats = CalibrationStats()
            acc = self.accs.get(name)
            if acc is not None:
                if id(acc) not in means:  # shared accumulators give their members the same tensors
                    n = max(acc.n_tokens, 1)
                    means[id(acc)] = (None if acc.abs_sum is None else acc.abs_sum / n,
                                      None if acc.sq_sum is None else acc.sq_sum / n)
                abs_mean, sq_mean = means[id(acc)]
                stats.gram = acc.gram if "gram" in fields else None
                stats.act_abs_mean = abs_mean if "act_abs_mean" in fields else None
                stats.act_sq_mean = sq_mean if "act_sq_mean" in fields else None
                stats.n_tokens = acc.n_tokens
            elif fields & ACTIVATION_FIELDS:
                raise DataError(f"calibration: module {name} was never called by the model's forward")
            if "fisher" in fields:
                if name not in self.fisher:
                    raise DataError(f"calibration: no gradient reached {name} (is it used by the LM loss?)")
                stats.fisher = self.fisher[name]
            out[name] = stats
        return out


def check_request(model: nn.Module, request: StatsRequest) -> None:
    """Unknown fields or modules that are not Linear layers are programming errors worth one clear line."""
    for name, fields in request.items():
        unknown = set(fields) - KNOWN_FIELDS
        if unknown:
            raise DataError(f"calibration: unknown statistic(s) {sorted(unknown)} for {name}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise DataError(f"calibration: the model has no module {name}") from None
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise DataError(f"calibration: {name} is not a dense Linear layer (already factorized?)")


def collect_stats(model: nn.Module, input_ids: torch.Tensor, request: StatsRequest, batch_size: int = 4,
                  progress: Progress | None = None) -> dict[str, CalibrationStats]:
    """One pass over ``input_ids`` (N × L) collecting, for each requested module, the fields it needs.

    Activation statistics come from forward hooks under ``torch.no_grad()``; when some target needs
    Fisher information the pass runs one sequence at a time with a backward each, gradients enabled on
    the targeted weights only (the other parameters' ``requires_grad`` flags are restored afterwards).
    """
    check_request(model, request)
    request = {name: frozenset(fields) for name, fields in request.items() if fields}
    if not request:
        return {}
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise DataError(f"calibration: expected an N × L tensor of token ids, got shape {tuple(input_ids.shape)}")
    collector = _Collector(model, request)
    need_fisher = bool(collector.fisher_names)
    if need_fisher and not (is_causal_lm(model) and forward_caps(model).labels):
        raise DataError(f"calibration: Fisher information needs a causal LM loss; {type(model).__name__} has none")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    was_training = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    total = int(input_ids.shape[0])
    bounds = batch_bounds(total, 1 if need_fisher else batch_size)
    forward_kw = _forward_kwargs(model, need_fisher)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in collector.fisher_names:
            model.get_submodule(name).weight.requires_grad_(True)
        collector.attach()
        for start, end in itertools.pairwise(bounds):
            batch = input_ids[start:end]
            if need_fisher:
                with torch.enable_grad():
                    out = model(input_ids=batch, labels=batch, **forward_kw)
                    out.loss.backward()
                collector.add_fisher()
            else:
                with torch.no_grad(), contextlib.suppress(_StopForward):
                    model(input_ids=batch, **forward_kw)
            collector.end_forward()
            if progress is not None:
                progress(end, total)
    finally:
        collector.detach()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return collector.results(request)


def batch_bounds(total: int, batch_size: int) -> list[int]:
    """Batch edges: one sequence first (the full forward that decides on early exits is then cheap), then
    ``batch_size`` at a time. ``batch_bounds(8, 4) == [0, 1, 5, 8]``."""
    return [0, *range(1, total, batch_size), total] if total > 1 else [0, total]


def _forward_kwargs(model: nn.Module, need_loss: bool) -> dict[str, object]:
    """No KV cache; and, when no loss is needed, logits for the last position only (saves N·L·vocab floats)."""
    caps = forward_caps(model)
    kw: dict[str, object] = {}
    if caps.use_cache:
        kw["use_cache"] = False
    if not need_loss and caps.logits_to_keep:
        kw["logits_to_keep"] = 1
    return kw

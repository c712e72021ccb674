"""Size budgets in explicit units, and the accounting that turns one into a cap on the targets' parameters.

Compression papers disagree on what "80%" means (kept vs removed; whole model vs decomposed matrices), so a
:class:`Budget` always carries its unit and every report states it:

* ``model-params``: a fraction in (0, 1] of the *whole model's* parameters to keep (every parameter counted
  once: tied embeddings once; embeddings, LM head, norms and biases included and never decomposed);
* ``decoder-params``: a fraction in (0, 1] of the *decoder linear weight* parameters to keep (the targets'
  m·n summed over every layer and role: the denominator the SVD-LLM / ASVD tables use);
* ``bytes``: an absolute number of bytes of the whole model's parameters (``"250MB"``, ``"300MiB"`` or an
  int), at the dtype the model is loaded in.

:class:`Accounting` measures a model once and converts any budget into ``cap``: the most parameters the
targets may keep in total. Allocators choose ranks whose summed factor parameters are ``<= cap``: a
budget is never exceeded (the achieved size is reported next to it, usually a little under).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from torch import nn

from rankwise.design.ranks import factor_params
from rankwise.errors import PlanError
from rankwise.models.zoo import param_size

Unit = Literal["model-params", "decoder-params", "bytes"]
UNITS: tuple[Unit, ...] = ("model-params", "decoder-params", "bytes")
Target = tuple[int, str]

_BYTE_SUFFIX = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """How much of the model to keep, in a stated unit (see the module docstring)."""

    value: float
    unit: Unit

    @classmethod
    def parse(cls, value: object, unit: str) -> Budget:
        """``Budget.parse(0.8, "decoder-params")``, ``Budget.parse("250MB", "bytes")``; bad input -> PlanError."""
        if unit not in UNITS:
            raise PlanError(f"--unit: '{unit}' is not a budget unit (known: {', '.join(UNITS)})")
        if unit == "bytes":
            return cls(float(parse_bytes(value)), "bytes")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise PlanError(f"--budget: '{value}' is not a fraction in (0, 1] of {unit}") from None
        if not 0.0 < number <= 1.0 or not math.isfinite(number):
            raise PlanError(f"--budget: {number:g} is not a fraction in (0, 1] of {unit} to keep")
        return cls(number, unit)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.unit == "bytes":
            return f"{int(self.value):,} bytes of parameters"
        what = "the whole model's parameters" if self.unit == "model-params" else "decoder linear weight parameters"
        return f"{self.value:.4g} of {what} kept"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "meaning": self.describe()}


def parse_bytes(value: object) -> int:
    """An int byte count from ``123456``, ``"250MB"``, ``"1.5GiB"``; bad input -> PlanError."""
    if isinstance(value, bool):
        raise PlanError(f"--budget: {value!r} is not a byte count")
    if isinstance(value, int | float):
        number, suffix = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _BYTE_SUFFIX:
            raise PlanError(f"--budget: '{value}' is not a byte count (e.g. 250000000, 250MB, 240MiB)")
        number, suffix = float(match.group(1)), match.group(2).lower()
    out = int(number * _BYTE_SUFFIX[suffix])
    if out <= 0:
        raise PlanError(f"--budget: {value!r} bytes is not positive")
    return out


@dataclass(frozen=True)
class TargetSize:
    """One decomposable weight for accounting: (layer, role), shape and the factor form its method stores."""

    layer: int
    role: str
    m: int  # out_features
    n: int  # in_features
    form: str = "two_factor"  # "three_factor" (+ r²) or "two_factor"

    @property
    def key(self) -> Target:
        return (self.layer, self.role)

    @property
    def dense(self) -> int:
        return self.m * self.n

    def params(self, rank: int | None) -> int:
        """Stored parameters at ``rank`` (None = left dense)."""
        return self.dense if rank is None else factor_params(rank, self.m, self.n, self.form)  # type: ignore[arg-type]

    @cached_property
    def max_rank(self) -> int:
        """The largest rank whose factors are strictly smaller than the dense matrix (0 if none is)."""
        s = self.m + self.n
        if self.form == "three_factor":  # r² + r·s < m·n
            r = int((-s + math.sqrt(s * s + 4 * self.dense)) / 2)
        else:
            r = self.dense // s
        r = min(r + 1, min(self.m, self.n))
        while r > 0 and self.params(r) >= self.dense:
            r -= 1
        return r


@dataclass(frozen=True)
class Accounting:
    """A model's sizes, measured once: the targets, everything else (fixed), bytes per parameter, blocks."""

    targets: tuple[TargetSize, ...]
    model_params: int  # whole model, each parameter once
    bytes_per_param: int  # of the target weights (the dtype the model is loaded in)
    fixed_bytes: int  # bytes of every parameter that is not a target weight
    block_params: tuple[int, ...] = ()  # parameters of each decoder block (for layer removal)
    block_bytes: tuple[int, ...] = ()

    @property
    def decoder_params(self) -> int:
        """Decoder linear weight parameters: the targets' m·n summed."""
        return sum(t.dense for t in self.targets)

    @property
    def fixed_params(self) -> int:
        return self.model_params - self.decoder_params

    def cap(self, budget: Budget) -> int:
        """The most parameters the targets may keep so the whole plan meets ``budget`` (can be negative)."""
        if budget.unit == "decoder-params":
            return math.floor(budget.value * self.decoder_params + 1e-9)
        if budget.unit == "model-params":
            return math.floor(budget.value * self.model_params + 1e-9) - self.fixed_params
        return math.floor((budget.value - self.fixed_bytes) / self.bytes_per_param)

    def minimum(self) -> int:
        """Target parameters of the smallest plan (rank 1 everywhere)."""
        return sum(t.params(1) if t.max_rank >= 1 else t.dense for t in self.targets)

    def check(self, budget: Budget) -> int:
        """``cap(budget)``, or a one-line PlanError if no plan can meet it."""
        cap = self.cap(budget)
        low = self.minimum()
        if cap < low:
            raise PlanError(f"budget {budget.describe()} is below the smallest possible plan (rank 1 everywhere: "
                            f"{self.measure(low)[budget.unit]:.4g} in {budget.unit})")
        return cap

    def measure(self, target_params: int, removed_layers: Iterable[int] = ()) -> dict[str, float]:
        """A plan's size in every unit: kept fraction of model/decoder params, and bytes.

        ``target_params`` is what the targets of the *kept* blocks keep (decomposed or dense); removed blocks
        take all their parameters out of the model count (and their weights out of ``target_params``).
        """
        removed = sorted(set(removed_layers))
        dec_removed = sum(t.dense for t in self.targets if t.layer in removed)
        blk_removed = sum(self.block_params[i] for i in removed) if removed else 0
        blk_bytes = sum(self.block_bytes[i] for i in removed) if removed else 0
        other_removed = blk_removed - dec_removed
        model = self.fixed_params - other_removed + target_params
        nbytes = self.fixed_bytes - (blk_bytes - dec_removed * self.bytes_per_param) \
            + target_params * self.bytes_per_param
        return {"model-params": model / self.model_params, "decoder-params": target_params / self.decoder_params,
                "bytes": float(nbytes), "params": float(model), "target_params": float(target_params)}


def accounting_for(model: nn.Module, forms: Mapping[str, str] | str = "two_factor") -> Accounting:
    """Measure ``model`` (through its architecture adapter); ``forms`` is the factor form for every role
    (a str) or per role, as the decomposition method will store it (Tucker unfolded: ``"three_factor"``)."""
    from rankwise.models.adapters import adapter_for

    adapter = adapter_for(model)
    infos = adapter.targets()
    targets = tuple(TargetSize(t.layer, t.role, t.out_features, t.in_features,
                               forms if isinstance(forms, str) else forms.get(t.role, "two_factor"))
                    for t in infos)
    model_params, model_bytes = param_size(model)
    sizes = {adapter.linear(t.layer, t.role).weight.element_size() for t in infos}
    if len(sizes) != 1:
        raise PlanError("budget accounting: the target weights have mixed dtypes; load the model in one dtype")
    bpp = sizes.pop()
    target_bytes = sum(t.dense for t in targets) * bpp
    blocks = [adapter.block(i) for i in range(adapter.n_layers)]
    block_params, block_bytes = (tuple(x) for x in zip(*(param_size(b) for b in blocks), strict=True))
    return Accounting(targets, model_params, bpp, model_bytes - target_bytes, block_params, block_bytes)

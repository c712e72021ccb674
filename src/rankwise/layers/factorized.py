"""The factorized layer that replaces an ``nn.Linear``.

A decomposition gives W ≈ A · G · Bᵀ with A (out×r1), core G (r1×r2) and B (in×r2) — the paper's Tucker-2
form. The layer runs it as small matmuls, exactly as the paper's code does (three bias-free Linears,
d_in → r2 → r1 → d_out), or *folded* into two (d_in → r2 → d_out, with A·G precomputed), which saves
r1·r2 parameters and one kernel launch and is what makes low ranks pay off in practice. Two-factor
methods (SVD) are the case r1 == r2 with G diagonal folded away.

The module is made of plain ``nn.Linear`` children (``first``, ``core``, ``last``) so its state dict is
ordinary tensors with obvious names (``…q_proj.first.weight``) that safetensors stores and any loader can
re-inject (PEFT-style): see :mod:`rankwise.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.fileio import JsonRecord

Form = Literal["three_factor", "two_factor"]
Layout = Literal["row", "col"]
FACTORS = ("first", "core", "last")


def weight_layout(weight: torch.Tensor) -> Layout:
    """``row``: stored (out, in) row-major, as nn.Linear creates it; ``col``: stored (in, out), seen transposed."""
    return "col" if weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) != 1 else "row"


def relayout_(linear: nn.Linear, layout: Layout) -> None:
    """Re-store ``linear.weight`` in ``layout`` without changing its shape or values (in place).

    ``F.linear(x, W)`` computes x·Wᵀ. With the ``col`` layout Wᵀ is a contiguous (in, out) matrix, so a
    single-token GEMV streams long rows of length ``out`` instead of ``out`` short dot products of length
    ``in``: for factors with out ≫ in (the d×r "last" factor) that doubles the bandwidth measured on CPU
    (bench/speedup.py, :mod:`rankwise.efficiency.execution`). State dicts and checkpoints are unaffected:
    savers write ``.contiguous()`` tensors with the standard (out, in) shape.
    """
    w = linear.weight
    if weight_layout(w) == layout:
        return
    data = w.detach().t().contiguous().t() if layout == "col" else w.detach().contiguous()
    linear.weight = nn.Parameter(data, requires_grad=w.requires_grad)


@dataclass(frozen=True)
class FactorizedShape(JsonRecord):
    """Everything needed to rebuild an empty :class:`FactorizedLinear` before loading its weights."""

    in_features: int
    out_features: int
    rank_out: int  # r1: columns of A
    rank_in: int  # r2: columns of B
    form: Form
    bias: bool

    @property
    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each factor's weight: first (r2×in), core (r1×r2, three-factor only), last (out×r1;
        out×r2 when two-factor)."""
        if self.form == "three_factor":
            return {"first": (self.rank_in, self.in_features), "core": (self.rank_out, self.rank_in),
                    "last": (self.out_features, self.rank_out)}
        return {"first": (self.rank_in, self.in_features), "last": (self.out_features, self.rank_in)}

    @property
    def params(self) -> int:
        """Parameters of the layer in this form (bias included)."""
        n = sum(o * i for o, i in self.factor_shapes.values())
        return n + (self.out_features if self.bias else 0)


def _contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State dicts always hold contiguous (out, in) tensors, whatever layout the factors execute in."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


class FactorizedLinear(nn.Module):
    """y = x·B·Gᵀ·Aᵀ + b, as two or three chained Linears; a drop-in replacement for ``nn.Linear``."""

    def __init__(self, shape: FactorizedShape, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.in_features = shape.in_features
        self.out_features = shape.out_features
        kw = {"dtype": dtype, "device": device}
        dims = shape.factor_shapes
        self.first = nn.Linear(dims["first"][1], dims["first"][0], bias=False, **kw)
        self.core = nn.Linear(dims["core"][1], dims["core"][0], bias=False, **kw) if "core" in dims else None
        self.last = nn.Linear(dims["last"][1], dims["last"][0], bias=shape.bias, **kw)
        self.register_state_dict_post_hook(_contiguous_state)

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_factors(cls, A: torch.Tensor, G: torch.Tensor | None, B: torch.Tensor,
                     bias: torch.Tensor | None = None, fold: bool = False,
                     dtype: torch.dtype | None = None) -> FactorizedLinear:
        """Build from W ≈ A·G·Bᵀ (G=None means A·Bᵀ). ``fold=True`` stores A·G as one factor.

        Factors are combined in float32 (or better) and only then cast to ``dtype``, so folding does
        not add rounding error in half precision.
        """
        out_features, r1 = A.shape
        in_features, r2 = B.shape
        if G is not None and tuple(G.shape) != (r1, r2):
            raise ValueError(f"core shape {tuple(G.shape)} does not match A {tuple(A.shape)} and B {tuple(B.shape)}")
        dtype = dtype or A.dtype
        two = G is None or fold or r1 == 0
        form: Form = "two_factor" if two else "three_factor"
        shape = FactorizedShape(in_features, out_features, rank_out=r2 if two else r1, rank_in=r2, form=form,
                                bias=bias is not None)
        layer = cls(shape, dtype=dtype, device=A.device)
        with torch.no_grad():
            work = torch.promote_types(A.dtype, torch.float32)
            layer.first.weight.copy_(B.to(work).T.to(dtype))
            if form == "three_factor":
                layer.core.weight.copy_(G.to(dtype))  # type: ignore[union-attr]
                layer.last.weight.copy_(A.to(dtype))
            else:
                last = A.to(work) if G is None else A.to(work) @ G.to(work)
                layer.last.weight.copy_(last.to(dtype))
            if bias is not None:
                layer.last.bias.copy_(bias.to(dtype))
        return layer

    # --- execution ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Direct F.linear calls, not the child modules' __call__: at decode time (one token) these are
        # tiny GEMVs and module-call overhead is a measurable share of the layer's time (bench/speedup.py).
        h = F.linear(x, self.first.weight)
        if self.core is not None:
            h = F.linear(h, self.core.weight)
        return F.linear(h, self.last.weight, self.last.bias)

    # --- views ----------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent A·G·Bᵀ (computed on demand; for code that reads ``.weight``)."""
        return self.dense_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            work = torch.promote_types(self.first.weight.dtype, torch.float32)
            left = self.last.weight.to(work)
            if self.core is not None:
                left = left @ self.core.weight.to(work)
            return (left @ self.first.weight.to(work)).to(self.first.weight.dtype)

    def folded(self) -> FactorizedLinear:
        """The same map in two-factor form (A·G folded): fewer parameters and one matmul less."""
        if self.core is None:
            return self
        A, G, B = self.last.weight, self.core.weight, self.first.weight.T
        return FactorizedLinear.from_factors(A, G, B, self.last.bias, fold=True, dtype=self.first.weight.dtype)

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dense equivalent weight (undoes the factorization's structure)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.last.bias is not None,
                          dtype=self.first.weight.dtype, device=self.first.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.last.bias is not None:
                dense.bias.copy_(self.last.bias)
        return dense

    def factors(self) -> dict[str, nn.Linear]:
        """The factor Linears by name (``first``, ``core`` when three-factor, ``last``)."""
        return {name: m for name in FACTORS if (m := getattr(self, name)) is not None}

    @property
    def layouts(self) -> dict[str, Layout]:
        """How each factor's weight is stored in memory (see :func:`relayout_`)."""
        return {name: weight_layout(m.weight) for name, m in self.factors().items()}

    def set_layouts(self, layouts: dict[str, Layout]) -> FactorizedLinear:
        """Re-store factors in the given layouts (an execution choice; values and state dict unchanged)."""
        for name, layout in layouts.items():
            relayout_(self.factors()[name], layout)
        return self

    def extra_repr(self) -> str:
        s = self.shape
        lay = "" if all(v == "row" for v in self.layouts.values()) else \
            ", layouts=" + "/".join(f"{k}:{v}" for k, v in self.layouts.items())
        return f"in={s.in_features}, out={s.out_features}, ranks=[{s.rank_out}, {s.rank_in}], form={s.form}{lay}"

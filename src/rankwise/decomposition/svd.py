"""Plain truncated SVD: the data-free two-factor baseline, optimal in Frobenius norm (Eckart–Young)."""

from __future__ import annotations

import torch

from rankwise.decomposition.base import (
    CalibrationStats,
    DecompositionMethod,
    Factors,
    MethodResult,
    Rank,
    check_weight,
    register_method,
)
from rankwise.decomposition.solvers import singular_values, truncated_svd


def balanced_factors(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> Factors:
    """A = U·diag(√s), B = V·diag(√s): both factors carry half the scale.

    Splitting √s to each side (rather than folding s into one factor) keeps the two factors' magnitudes
    alike, which matters once they are cast to float16/bfloat16 and multiplied in sequence.
    """
    root = torch.sqrt(s.clamp_min(0))
    return Factors(A=(U * root).float().contiguous(), G=None, B=(V * root).float().contiguous())


@register_method
class SVD(DecompositionMethod):
    """W ≈ U_r·diag(s_r)·V_rᵀ stored as two balanced factors A = U_r·√s_r (m×r), B = V_r·√s_r (n×r)."""

    name = "svd"
    form = "two_factor"
    summary = "truncated SVD (data-free, two factors, Frobenius-optimal)"

    def __init__(self, solver: str = "auto") -> None:
        self.solver = solver

    def decompose(self, weight: torch.Tensor, rank: Rank, stats: CalibrationStats | None = None) -> MethodResult:
        W = check_weight(weight, self.name)
        r, _ = self.ranks_for(rank, *W.shape)
        res = truncated_svd(W, r, self.solver)
        return MethodResult(balanced_factors(res.U, res.s, res.V), [], res.solver, {})

    def singular_values(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> torch.Tensor:
        return singular_values(check_weight(weight, self.name))

"""FWSVD — Fisher-weighted SVD (Hsu et al. 2022, "Language model compression with weighted low-rank
factorization", ICLR 2022).

Rows of W whose parameters the task loss is sensitive to should be approximated better. FWSVD estimates
each row's importance from the Fisher information — accumulated squared gradients of the loss w.r.t. W —
as I_i = sqrt(Σ_j F_ij), and truncates diag(I)·W instead of W:
diag(I)·W ≈ U_r·Σ_r·V_rᵀ ⇒ W ≈ (diag(I)⁻¹·U_r·√Σ_r)·(V_r·√Σ_r)ᵀ, minimizing ‖diag(I)·(W − Ŵ)‖_F.
Needs calibration statistic ``fisher`` ((m, n) squared gradients, or their row sums (m,)).
"""

from __future__ import annotations

import logging

import torch

from rankwise.decomposition.base import (
    CalibrationStats,
    DecompositionMethod,
    Factors,
    MethodResult,
    Rank,
    check_weight,
    register_method,
    stats_field,
)
from rankwise.decomposition.solvers import singular_values, truncated_svd
from rankwise.errors import DecompositionError

log = logging.getLogger(__name__)

FLOOR = 1e-6  # row weights are clamped at FLOOR × the largest weight


def row_weights(fisher: torch.Tensor, m: int, fallbacks: list[str] | None = None) -> torch.Tensor:
    """I_i = sqrt(Σ_j F_ij) per output row (float64); zero rows are clamped and noted."""
    f = fisher.detach().to(torch.float64)
    if f.ndim == 2:
        if f.shape[0] != m:
            raise DecompositionError(f"fwsvd: fisher has shape {tuple(f.shape)}, weight has {m} output rows")
        f = f.sum(dim=1)
    elif f.ndim != 1 or f.numel() != m:
        raise DecompositionError(f"fwsvd: fisher has shape {tuple(f.shape)}, expected ({m}, n) or ({m},)")
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise DecompositionError("fwsvd: fisher contains NaN/Inf or negative values (expected squared gradients)")
    weights = torch.sqrt(f)
    top = float(weights.max())
    if top <= 0.0:
        raise DecompositionError("fwsvd: fisher information is all zero (no gradient reached this layer)")
    floor = FLOOR * top
    low = int((weights < floor).sum())
    if low:
        note = f"fwsvd: {low} of {m} rows had ~zero Fisher information; weight clamped at {FLOOR:g}×max"
        log.warning(note)
        if fallbacks is not None:
            fallbacks.append(note)
        weights = weights.clamp_min(floor)
    return weights


@register_method
class FWSVD(DecompositionMethod):
    """SVD of diag(I)·W with Fisher row weights I, unweighted into the left factor; two factors of rank r."""

    name = "fwsvd"
    needs = frozenset({"fisher"})
    form = "two_factor"
    summary = "Fisher-weighted SVD (rows weighted by sqrt of summed squared gradients; needs fisher)"

    def __init__(self, solver: str = "auto") -> None:
        self.solver = solver

    def decompose(self, weight: torch.Tensor, rank: Rank, stats: CalibrationStats | None = None) -> MethodResult:
        W = check_weight(weight, self.name)
        stats = self.check_stats(stats)
        r, _ = self.ranks_for(rank, *W.shape)
        fallbacks: list[str] = []
        w = row_weights(stats_field(stats, "fisher", W), W.shape[0], fallbacks)
        M = W * w.to(torch.float32)[:, None]
        res = truncated_svd(M, r, self.solver)
        root = torch.sqrt(res.s.clamp_min(0))
        A = ((res.U.to(torch.float64) / w[:, None]) * root.to(torch.float64)).float().contiguous()
        B = (res.V * root).float().contiguous()
        total = float(torch.linalg.norm(M.to(torch.float64))) ** 2
        kept = float((res.s.to(torch.float64) ** 2).sum())
        weighted = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
        return MethodResult(Factors(A, None, B), fallbacks, res.solver, {"fisher_weighted_error": weighted})

    def singular_values(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> torch.Tensor:
        W = check_weight(weight, self.name)
        stats = self.check_stats(stats)
        w = row_weights(stats_field(stats, "fisher", W), W.shape[0])
        return singular_values(W * w.to(torch.float32)[:, None])

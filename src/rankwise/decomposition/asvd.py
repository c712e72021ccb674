"""ASVD — activation-aware SVD (Yuan et al. 2023, arXiv:2312.05821).

Input channels that carry large activations matter more to the layer's output, so ASVD scales W's
columns by S = diag(mean|x|^α) before truncating, and undoes the scaling in the right factor:
W·S ≈ U_r·Σ_r·V_rᵀ  ⇒  W ≈ (U_r·√Σ_r)·(S⁻¹·V_r·√Σ_r)ᵀ. This minimizes ‖(W − Ŵ)·S‖_F, a diagonal proxy for
the output error; α = 0.5 is the paper's default. Needs calibration statistic ``act_abs_mean``.
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

FLOOR = 1e-6  # channel scales are clamped at FLOOR × the largest scale


def channel_scales(act_abs_mean: torch.Tensor, n: int, alpha: float,
                   fallbacks: list[str] | None = None) -> torch.Tensor:
    """diag(S) = mean|x|^α per input channel (float64), with dead channels clamped and noted."""
    a = act_abs_mean.detach().to(torch.float64).reshape(-1)
    if a.numel() != n:
        raise DecompositionError(f"asvd: act_abs_mean has {a.numel()} channels, weight has {n} input features")
    if not bool(torch.isfinite(a).all()):
        raise DecompositionError("asvd: act_abs_mean contains NaN/Inf")
    s = a.abs().pow(alpha)
    top = float(s.max())
    if top <= 0.0:
        raise DecompositionError("asvd: all calibration activations are zero; no channel scaling to use")
    floor = FLOOR * top
    low = int((s < floor).sum())
    if low:
        note = f"asvd: {low} of {n} input channels had ~zero activation; scale clamped at {FLOOR:g}×max"
        log.warning(note)
        if fallbacks is not None:
            fallbacks.append(note)
        s = s.clamp_min(floor)
    return s


@register_method
class ASVD(DecompositionMethod):
    """SVD of W·diag(mean|x|^α), unscaled into the right factor; two factors of rank r."""

    name = "asvd"
    needs = frozenset({"act_abs_mean"})
    form = "two_factor"
    summary = "activation-aware SVD (input channels scaled by mean|x|^0.5; needs act_abs_mean)"

    def __init__(self, alpha: float = 0.5, solver: str = "auto") -> None:
        self.alpha = alpha
        self.solver = solver

    def decompose(self, weight: torch.Tensor, rank: Rank, stats: CalibrationStats | None = None) -> MethodResult:
        W = check_weight(weight, self.name)
        stats = self.check_stats(stats)
        r, _ = self.ranks_for(rank, *W.shape)
        fallbacks: list[str] = []
        s = channel_scales(stats_field(stats, "act_abs_mean", W), W.shape[1], self.alpha, fallbacks)
        M = W * s.to(torch.float32)
        res = truncated_svd(M, r, self.solver)
        root = torch.sqrt(res.s.clamp_min(0))
        A = (res.U * root).float().contiguous()
        B = ((res.V.to(torch.float64) / s[:, None]) * root.to(torch.float64)).float().contiguous()
        total = float(torch.linalg.norm(M.to(torch.float64))) ** 2
        kept = float((res.s.to(torch.float64) ** 2).sum())
        scaled = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
        return MethodResult(Factors(A, None, B), fallbacks, res.solver, {"scaled_error": scaled})

    def singular_values(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> torch.Tensor:
        W = check_weight(weight, self.name)
        stats = self.check_stats(stats)
        s = channel_scales(stats_field(stats, "act_abs_mean", W), W.shape[1], self.alpha)
        return singular_values(W * s.to(torch.float32))

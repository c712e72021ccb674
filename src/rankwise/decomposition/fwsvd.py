"""FWSVD — Fisher-weighted SVD (Hsu et al. 2022, "Language model compression with weighted low-rank
factorization", ICLR 2022).

Rows of W whose parameters the task loss is sensitive to should be approximated better. FWSVD estimates
each row's importance from the Fisher information — accumulated squared gradients of the loss w.r.t. W —
as I_i = sqrt(Σ_j F_ij), and truncates diag(I)·W instead of W:
diag(I)·W ≈ U_r·Σ_r·V_rᵀ ⇒ W ≈ (diag(I)⁻¹·U_r·√Σ_r)·(V_r·√Σ_r)ᵀ, minimizing ‖diag(I)·(W − Ŵ)‖_F.
Needs calibration statistic ``fisher`` ((m, n) squared gradients, or their row sums (m,)).
"""

from __future__ import annotations

import torch

from rankwise.decomposition.base import SolverConfig
from rankwise.decomposition.scaled import ScaledSVDMethod, Scaling, clamped_scales
from rankwise.errors import DecompositionError


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
    return clamped_scales(torch.sqrt(f), "fwsvd", "rows had ~zero Fisher information",
                          "fisher information is all zero (no gradient reached this layer)", fallbacks)


class FWSVD(ScaledSVDMethod[SolverConfig], name="fwsvd", statistic="fisher", error_name="fisher_weighted_error",
            summary="Fisher-weighted SVD (rows weighted by sqrt of summed squared gradients; needs fisher)"):
    """SVD of diag(I)·W with Fisher row weights I, unweighted into the left factor; two factors of rank r."""

    def scaling(self, W: torch.Tensor, fisher: torch.Tensor, fallbacks: list[str]) -> Scaling:
        w = row_weights(fisher, W.shape[0], fallbacks)
        return Scaling(W * w.to(torch.float32)[:, None], unscale_left=lambda A: A / w[:, None])

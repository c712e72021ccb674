"""Plain truncated SVD: the data-free two-factor baseline, optimal in Frobenius norm (Eckart–Young)."""

from __future__ import annotations

import torch

from rankwise.decomposition.base import CalibrationStats, register_method
from rankwise.decomposition.scaled import ScaledSVDMethod, Scaling


@register_method
class SVD(ScaledSVDMethod):
    """W ≈ U_r·diag(s_r)·V_rᵀ stored as two balanced factors A = U_r·√s_r (m×r), B = V_r·√s_r (n×r)."""

    name = "svd"
    summary = "truncated SVD (data-free, two factors, Frobenius-optimal)"

    def scaling(self, W: torch.Tensor, stats: CalibrationStats, fallbacks: list[str]) -> Scaling:
        return Scaling(W)

"""Plain truncated SVD: the data-free two-factor baseline, optimal in Frobenius norm (Eckart–Young)."""

from __future__ import annotations

import torch

from rankwise.decomposition.base import SolverConfig
from rankwise.decomposition.scaled import ScaledSVDMethod, Scaling


class SVD(ScaledSVDMethod[SolverConfig], name="svd",
          summary="truncated SVD (data-free, two factors, Frobenius-optimal)"):
    """W ≈ U_r·diag(s_r)·V_rᵀ stored as two balanced factors A = U_r·√s_r (m×r), B = V_r·√s_r (n×r)."""

    def scaling(self, W: torch.Tensor, statistic: torch.Tensor | None, fallbacks: list[str]) -> Scaling:
        return Scaling(W)

"""ASVD — activation-aware SVD (Yuan et al. 2023, arXiv:2312.05821).

Input channels that carry large activations matter more to the layer's output, so ASVD scales W's
columns by S = diag(mean|x|^α) before truncating, and undoes the scaling in the right factor:
W·S ≈ U_r·Σ_r·V_rᵀ  ⇒  W ≈ (U_r·√Σ_r)·(S⁻¹·V_r·√Σ_r)ᵀ. This minimizes ‖(W − Ŵ)·S‖_F, a diagonal proxy for
the output error; α = 0.5 is the paper's default (setting ``alpha``). Needs calibration statistic
``act_abs_mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.decomposition.base import SolverConfig, setting
from rankwise.decomposition.scaled import ScaledSVDMethod, Scaling, clamped_scales
from rankwise.errors import DecompositionError


def channel_scales(act_abs_mean: torch.Tensor, n: int, alpha: float,
                   fallbacks: list[str] | None = None) -> torch.Tensor:
    """diag(S) = mean|x|^α per input channel (float64), with dead channels clamped and noted."""
    a = act_abs_mean.detach().to(torch.float64).reshape(-1)
    if a.numel() != n:
        raise DecompositionError(f"asvd: act_abs_mean has {a.numel()} channels, weight has {n} input features")
    if not bool(torch.isfinite(a).all()):
        raise DecompositionError("asvd: act_abs_mean contains NaN/Inf")
    return clamped_scales(a.abs().pow(alpha), "asvd", "input channels had ~zero activation",
                          "all calibration activations are zero; no channel scaling to use", fallbacks)


@dataclass(frozen=True)
class ASVDConfig(SolverConfig):
    """ASVD's settings: the solver's, and the exponent α of the channel scales mean|x|^α."""

    alpha: float = setting(0.5, "a number in (0, 1]", lambda v: 0 < v <= 1)


class ASVD(ScaledSVDMethod[ASVDConfig], name="asvd", statistic="act_abs_mean", error_name="scaled_error",
           summary="activation-aware SVD (input channels scaled by mean|x|^alpha, alpha 0.5; needs act_abs_mean)"):
    """SVD of W·diag(mean|x|^α), unscaled into the right factor; two factors of rank r."""

    def scaling(self, W: torch.Tensor, act_abs_mean: torch.Tensor, fallbacks: list[str]) -> Scaling:
        s = channel_scales(act_abs_mean, W.shape[1], self.config.alpha, fallbacks)
        return Scaling(W * s.to(torch.float32), unscale_right=lambda B: B / s[:, None])

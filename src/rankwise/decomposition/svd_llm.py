"""SVD-LLM — truncation-aware data whitening (Wang et al. 2024, arXiv:2403.07378).

What matters is the layer's output on real inputs, ‖X·(W − Ŵ)ᵀ‖_F, not ‖W − Ŵ‖_F. With the calibration
Gram XᵀX = S·Sᵀ (S lower-triangular, Cholesky) that error equals ‖(W − Ŵ)·S‖_F, so SVD-LLM truncates the
*whitened* matrix W·S = U·Σ·Vᵀ: keeping the top r gives A = U_r·√Σ_r and Bᵀ = √Σ_r·V_rᵀ·S⁻¹ (a triangular
solve, never an explicit inverse). Each dropped singular value then maps directly to output error:
the whitened error is sqrt(Σ_{i>r} σ_i²)/‖W·S‖ — provably optimal for this objective.

The Gram of a short calibration set is often singular (dead channels, fewer tokens than features), so
the Cholesky step has a logged fallback chain, each step recorded in ``MethodResult.fallbacks``:
float64 Cholesky → Cholesky of XᵀX + ε·mean(diag)·I for ε = 1e-6, 1e-5, …, 1e-2 → eigendecomposition
with eigenvalues clamped at a small positive floor (S = Q·√Λ). It never fails silently.
Setting ``damping`` (default 0: none) adds damping·mean(diag)·I to the Gram before the first Cholesky, the
ridge some SVD-LLM implementations apply up front. Needs calibration statistic ``gram``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rankwise.decomposition.base import SolverConfig, setting
from rankwise.decomposition.scaled import ScaledSVDMethod, Scaling
from rankwise.errors import DecompositionError

log = logging.getLogger(__name__)

JITTERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
EIG_FLOOR = 1e-6  # eigenvalues clamped at EIG_FLOOR × mean(diag) in the last fallback


@dataclass
class Whitening:
    """S with XᵀX ≈ S·Sᵀ (float64): lower-triangular L (Cholesky), or Q·diag(root) (eigen fallback)."""

    S: torch.Tensor  # (n, n)
    kind: str  # "cholesky", "cholesky+jitter" or "eigh"
    Q: torch.Tensor | None = None  # eigenvectors, eigen fallback only
    root: torch.Tensor | None = None  # sqrt of the clamped eigenvalues, eigen fallback only

    def right_solve(self, C: torch.Tensor) -> torch.Tensor:
        """C·S⁻¹ for C (r×n), without forming S⁻¹."""
        C = C.to(torch.float64)
        if self.Q is None or self.root is None:
            return torch.linalg.solve_triangular(self.S, C, upper=False, left=False)
        return (C / self.root) @ self.Q.T  # S = Q·diag(root) ⇒ S⁻¹ = diag(1/root)·Qᵀ


def _note(fallbacks: list[str], text: str) -> None:
    log.warning(text)
    fallbacks.append(text)


def whitening(gram: torch.Tensor, n: int, fallbacks: list[str], damping: float = 0.0) -> Whitening:
    """The whitening factor of a calibration Gram (plus ``damping``·mean(diag)·I), following the documented
    fallback chain."""
    G = gram.detach().to(torch.float64)
    if tuple(G.shape) != (n, n):
        raise DecompositionError(f"svd-llm: gram has shape {tuple(G.shape)}, weight has {n} input features")
    if not bool(torch.isfinite(G).all()):
        raise DecompositionError("svd-llm: calibration gram contains NaN/Inf")
    G = G + G.T  # symmetrized in place from here on: at 7B widths each n × n float64 copy is up to 1 GB
    G *= 0.5
    scale = float(torch.diagonal(G).mean())
    if scale <= 0.0:
        raise DecompositionError("svd-llm: calibration gram has no positive diagonal (zero activations or a corrupt gram)")
    if damping > 0.0:
        G.diagonal().add_(damping * scale)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return Whitening(L, "cholesky")
    del L
    for eps in JITTERS:
        jittered = G.clone()
        jittered.diagonal().add_(eps * scale)  # G + eps·scale·I without an identity matrix
        L, info = torch.linalg.cholesky_ex(jittered)
        del jittered
        if int(info) == 0:
            _note(fallbacks, f"svd-llm: cholesky failed (gram not positive definite); added jitter {eps:g}·mean(diag)")
            return Whitening(L, "cholesky+jitter")
        del L
    lam, Q = torch.linalg.eigh(G)
    floor = EIG_FLOOR * scale
    clamped = int((lam < floor).sum())
    root = torch.sqrt(lam.clamp_min(floor))
    _note(fallbacks, f"svd-llm: cholesky failed even with jitter {JITTERS[-1]:g}; used eigendecomposition "
                     f"with {clamped} of {n} eigenvalues clamped at {EIG_FLOOR:g}·mean(diag)")
    return Whitening(Q * root, "eigh", Q=Q, root=root)


@dataclass(frozen=True)
class SVDLLMConfig(SolverConfig):
    """SVD-LLM's settings: the solver's, and the relative damping added to the Gram before whitening."""

    damping: float = setting(0.0, "a number >= 0", lambda v: v >= 0)


class SVDLLM(ScaledSVDMethod[SVDLLMConfig], name="svd-llm", statistic="gram", error_name="whitened_error",
             summary="truncation-aware whitening (Cholesky of the calibration Gram; needs gram)"):
    """SVD of the whitened W·S (XᵀX = S·Sᵀ), unwhitened by a triangular solve; two factors of rank r."""

    def scaling(self, W: torch.Tensor, gram: torch.Tensor, fallbacks: list[str]) -> Scaling:
        white = whitening(gram, W.shape[1], fallbacks, self.config.damping)
        M = (W.to(torch.float64) @ white.S).to(torch.float32)
        # Bᵀ = √Σ_r·V_rᵀ·S⁻¹ (r × n) by a triangular solve, never an explicit inverse
        return Scaling(M, unscale_right=lambda B: white.right_solve(B.T).T,
                       note=f"whitening '{white.kind}' too ill-conditioned")

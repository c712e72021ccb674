"""The interface every decomposition method implements, the method registry, and error measures.

A method turns one weight matrix W (out_features × in_features, as stored by ``nn.Linear``) into factors
W ≈ A · G · Bᵀ (:class:`Factors`). Data-aware methods (ASVD, SVD-LLM, FWSVD) also read per-layer
:class:`CalibrationStats`; each method declares which fields it ``needs`` so the calibration step collects
only those. Methods register themselves by name on import (TensorLy style), so adding a method is one new
class in one file plus one import line in :mod:`rankwise.decomposition`.

Numerics: methods work in float32 (float64 for Gram/Cholesky work) whatever the weight's dtype, and return
float32 factors; the caller casts to the model's dtype. A weight with NaN/Inf raises
:class:`~rankwise.errors.DecompositionError` — a method never returns an un-decomposed or random layer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from rankwise.errors import DecompositionError, PlanError

Form = Literal["tucker", "two_factor"]
Rank = int | tuple[int, int]


@dataclass
class Factors:
    """W ≈ A · G · Bᵀ with A (m×r1), core G (r1×r2) and B (n×r2); G is None for two-factor W ≈ A·Bᵀ."""

    A: torch.Tensor
    G: torch.Tensor | None
    B: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        """The dense m×n approximation (in the factors' dtype)."""
        left = self.A if self.G is None else self.A @ self.G
        return left @ self.B.T

    @property
    def ranks(self) -> tuple[int, int]:
        """(r1, r2): columns of A and of B (equal for two-factor methods)."""
        return int(self.A.shape[1]), int(self.B.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the matrix the factors approximate."""
        return int(self.A.shape[0]), int(self.B.shape[0])

    @property
    def params(self) -> int:
        """Stored parameters: r1·m + r1·r2 + r2·n (Tucker) or r·(m + n) (two-factor)."""
        core = 0 if self.G is None else self.G.numel()
        return self.A.numel() + core + self.B.numel()

    def to(self, dtype: torch.dtype) -> Factors:
        return Factors(self.A.to(dtype), None if self.G is None else self.G.to(dtype), self.B.to(dtype))


@dataclass
class CalibrationStats:
    """Per-Linear statistics over calibration inputs x (tokens × n), filled by :mod:`rankwise.calibration`."""

    gram: torch.Tensor | None = None  # XᵀX summed over tokens, (n, n), float64 or float32
    act_abs_mean: torch.Tensor | None = None  # mean |x| per input channel, (n,)
    act_sq_mean: torch.Tensor | None = None  # mean x² per input channel, (n,)
    fisher: torch.Tensor | None = None  # accumulated squared gradients of W, (m, n)
    n_tokens: int = 0


@dataclass
class MethodResult:
    """What a method returns: the factors plus an honest record of how they were obtained."""

    factors: Factors
    fallbacks: list[str] = field(default_factory=list)  # human-readable notes of fallbacks taken
    solver: str = "exact"  # "exact" | "randomized" | ...
    extra: dict[str, float] = field(default_factory=dict)  # e.g. whitened error


class DecompositionMethod(ABC):
    """One way of factorizing a weight; subclasses set ``name`` and register with :func:`register_method`."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # CalibrationStats fields it reads, e.g. {"gram"}
    form: ClassVar[Form] = "two_factor"  # "tucker": params r1·m + r1·r2 + r2·n; "two_factor": r·(m + n)
    summary: ClassVar[str] = ""  # one line for listings

    @abstractmethod
    def decompose(self, weight: torch.Tensor, rank: Rank,
                  stats: CalibrationStats | None = None) -> MethodResult:
        """Factorize ``weight`` (m×n) at ``rank``; raise DecompositionError for an impossible request."""

    @abstractmethod
    def singular_values(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> torch.Tensor:
        """The full spectrum this method truncates (descending, float32), for ``energy:F`` rank specs.

        For plain SVD/Tucker it is W's spectrum; for data-aware methods it is the spectrum of the scaled
        or whitened matrix whose truncation the method actually performs.
        """

    # --- helpers shared by methods ----------------------------------------------------------------------
    def check_stats(self, stats: CalibrationStats | None) -> CalibrationStats:
        """The stats, or a one-line DecompositionError naming the missing calibration fields."""
        if not self.needs:
            return stats if stats is not None else CalibrationStats()
        missing = sorted(self.needs) if stats is None else sorted(f for f in self.needs if getattr(stats, f) is None)
        if missing:
            raise DecompositionError(
                f"method '{self.name}' needs calibration statistics {', '.join(missing)} (run calibration first)")
        assert stats is not None
        return stats

    def ranks_for(self, rank: Rank, m: int, n: int) -> tuple[int, int]:
        """Normalize ``rank`` to (r1, r2) checked against 1..min(m, n); two-factor forms need r1 == r2."""
        if isinstance(rank, bool):
            raise DecompositionError(f"{self.name}: {rank!r} is not a rank")
        if isinstance(rank, int):
            r1 = r2 = rank
        else:
            try:
                r1, r2 = (int(r) for r in rank)
            except (TypeError, ValueError):
                raise DecompositionError(f"{self.name}: rank {rank!r} is neither an int nor a pair [r1, r2]") from None
        if self.form == "two_factor" and r1 != r2:
            raise DecompositionError(f"{self.name}: two-factor method takes one rank, got [{r1}, {r2}]")
        full = min(m, n)
        for r in (r1, r2):
            if not 1 <= r <= full:
                raise DecompositionError(
                    f"{self.name}: rank {r} is outside 1..min(m, n) = {full} for a {m}x{n} matrix")
        return r1, r2


def check_weight(weight: torch.Tensor, method: str = "") -> torch.Tensor:
    """The weight as a finite float32 2-D tensor, or a one-line DecompositionError."""
    where = f"{method}: " if method else ""
    if weight.ndim != 2:
        raise DecompositionError(f"{where}weight must be a 2-D matrix, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise DecompositionError(f"{where}weight of shape {tuple(weight.shape)} is empty")
    work = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(work).all()):
        bad = int((~torch.isfinite(work)).sum())
        raise DecompositionError(f"{where}weight {tuple(weight.shape)} contains {bad} NaN/Inf values")
    return work


def stats_field(stats: CalibrationStats, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A required statistic, on the weight's device (checked present by ``check_stats`` beforehand)."""
    value = getattr(stats, name)
    if value is None:
        raise DecompositionError(f"calibration statistic '{name}' is missing")
    return value.to(weight.device)


# --- registry ---------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[DecompositionMethod]] = {}


def register_method(cls: type[DecompositionMethod]) -> type[DecompositionMethod]:
    """Class decorator: make ``cls`` available by ``cls.name`` (re-registering a name replaces it)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must set a non-empty class attribute 'name' to be registered")
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> DecompositionMethod:
    """A fresh instance of the method called ``name``; unknown names raise a one-line PlanError."""
    cls = _REGISTRY.get(str(name).strip().lower())
    if cls is None:
        raise PlanError(f"unknown decomposition method '{name}' (known: {', '.join(available_methods())})")
    return cls()


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


# --- error measures ---------------------------------------------------------------------------------------
def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, in float64."""
    w = weight.detach().to(torch.float64)
    diff = w - approx.detach().to(torch.float64)
    denom = float(torch.linalg.norm(w))
    return float(torch.linalg.norm(diff)) / denom if denom > 0 else float(torch.linalg.norm(diff))


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, stats: CalibrationStats | torch.Tensor) -> float:
    """Activation-weighted error sqrt(tr(E·XᵀX·Eᵀ) / tr(W·XᵀX·Wᵀ)) with E = W − Ŵ.

    This is ‖(W − Ŵ)·S‖_F / ‖W·S‖_F for XᵀX = S·Sᵀ, i.e. the relative error of the layer's *outputs* on the
    calibration tokens (‖X·Eᵀ‖ / ‖X·Wᵀ‖), which is what SVD-LLM minimizes. ``stats`` may be the Gram itself.
    """
    gram = stats if isinstance(stats, torch.Tensor) else stats.gram
    if gram is None:
        raise DecompositionError("weighted_error needs calibration statistics 'gram'")
    g = gram.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    e = w - approx.detach().to(torch.float64)
    num = float(((e @ g) * e).sum())
    den = float(((w @ g) * w).sum())
    num = max(num, 0.0)  # rounding can make a ~0 quadratic form slightly negative
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)

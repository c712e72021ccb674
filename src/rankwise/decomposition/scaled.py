"""Truncated SVD of a rescaled weight in balanced two-factor form: the core every SVD method shares.

SVD, ASVD, FWSVD and SVD-LLM differ only in *which* matrix they truncate: W itself, W·diag(s) (input
channels), diag(w)·W (output rows) or W·S (a whitening factor). Each then takes M ≈ U_r·Σ_r·V_rᵀ, splits
√Σ_r to both sides (A = U_r·√Σ_r, B = V_r·√Σ_r, so the two factors have alike magnitudes once they are cast
to 16-bit and multiplied in sequence) and maps the scaling back out of one factor. This module does that
shared part once (:class:`ScaledSVDMethod`); each method only supplies M and the inverse map
(:class:`Scaling`). The residual it reports, sqrt(Σ_{i>r} σ_i²)/‖M‖_F, is the error in the method's own
metric (scaled, Fisher-weighted, whitened).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rankwise.analysis.spectrum import singular_values
from rankwise.decomposition.base import (
    CalibrationStats,
    Factors,
    MethodResult,
    Rank,
    S,
    SolverMethod,
    check_weight,
    stats_field,
)
from rankwise.decomposition.solvers import SVDResult
from rankwise.errors import DecompositionError

log = logging.getLogger(__name__)

Unscale = Callable[[torch.Tensor], torch.Tensor]
SCALE_FLOOR = 1e-6  # scales are clamped at SCALE_FLOOR × the largest, so undoing them never divides by ~0


def clamped_scales(scales: torch.Tensor, method: str, what: str, zero_error: str,
                   fallbacks: list[str] | None = None) -> torch.Tensor:
    """Positive diagonal scales with near-zero entries (dead channels, rows without gradient) floored.

    ``what`` names the clamped entries in the note ("input channels had ~zero activation"); the note is
    logged and appended to ``fallbacks``. All-zero scales carry no information: ``zero_error`` is raised.
    """
    top = float(scales.max())
    if top <= 0.0:
        raise DecompositionError(f"{method}: {zero_error}")
    floor = SCALE_FLOOR * top
    low = int((scales < floor).sum())
    if low:
        note = f"{method}: {low} of {scales.numel()} {what}; clamped at {SCALE_FLOOR:g}×max"
        log.warning(note)
        if fallbacks is not None:
            fallbacks.append(note)
        scales = scales.clamp_min(floor)
    return scales


@dataclass
class ScaledTruncation:
    """Two factors of M's rank-r truncation with the scaling undone, and the error in M's metric."""

    factors: Factors
    residual: float  # sqrt(Σ_{i>r} σ_i(M)²) / ‖M‖_F
    solver: str


def relative_residual(M: torch.Tensor, kept: torch.Tensor) -> float:
    """sqrt(‖M‖² − Σ kept²)/‖M‖ from the kept singular values (no second SVD), clamped at 0."""
    total = float(torch.linalg.norm(M.to(torch.float64))) ** 2
    if total <= 0.0:
        return 0.0
    return (max(total - float((kept.to(torch.float64) ** 2).sum()), 0.0) / total) ** 0.5


def scaled_truncation(M: torch.Tensor, res: SVDResult, *, unscale_left: Unscale | None = None,
                      unscale_right: Unscale | None = None) -> ScaledTruncation:
    """M's truncation ``res`` (its top singular triplets) in balanced factors A = unscale_left(U·√Σ) (m×r),
    B = unscale_right(V·√Σ) (n×r), float32.

    The unscale maps receive float64 factors, so undoing a scaling adds no float32 rounding.
    """
    root = torch.sqrt(res.s.to(torch.float64).clamp_min(0))
    A = res.U.to(torch.float64) * root
    B = res.V.to(torch.float64) * root
    if unscale_left is not None:
        A = unscale_left(A)
    if unscale_right is not None:
        B = unscale_right(B)
    factors = Factors(A=A.float().contiguous(), G=None, B=B.float().contiguous())
    return ScaledTruncation(factors, relative_residual(M, res.s), res.solver)


@dataclass
class Scaling:
    """The matrix a method truncates, and how to map its factors back to W's."""

    matrix: torch.Tensor  # M, float32, same shape as W
    unscale_left: Unscale | None = None  # applied to U·√Σ (m×r, float64)
    unscale_right: Unscale | None = None  # applied to V·√Σ (n×r, float64)
    note: str = ""  # what could make the unscaled factors non-finite (named in that error)


class ScaledSVDMethod(SolverMethod[S]):
    """A two-factor method that truncates ``scaling(W, statistic).matrix`` and maps the scaling back out of the
    factors.

    Subclasses declare (as class keywords) ``name``, ``summary``, ``statistic`` (the one
    :class:`CalibrationStats` field :meth:`scaling` reads, which becomes ``needs``; None for data-free) and
    ``error_name`` (the key of the scaled-metric error in :attr:`MethodResult.extra`, or ``""``), give their
    config type as the type argument when they take settings beyond the solver's, and implement
    :meth:`scaling`.
    """

    form = "two_factor"
    statistic: ClassVar[str | None] = None
    error_name: ClassVar[str] = ""

    def __init_subclass__(cls, **declared: Any) -> None:
        super().__init_subclass__(**declared)
        cls.needs = frozenset({cls.statistic}) if cls.statistic else frozenset()

    @abstractmethod
    def scaling(self, W: torch.Tensor, statistic: torch.Tensor | None, fallbacks: list[str]) -> Scaling:
        """M and its inverse maps for the (checked, float32) weight W and the method's calibration
        ``statistic`` (on W's device; None when it reads none); notes go to ``fallbacks``."""

    def scaled(self, W: torch.Tensor, stats: CalibrationStats | None, fallbacks: list[str]) -> Scaling:
        """:meth:`scaling` of W with the statistic it reads taken from ``stats`` (checked present)."""
        stats = self.check_stats(stats)
        statistic = stats_field(stats, self.statistic, W) if self.statistic else None
        return self.scaling(W, statistic, fallbacks)

    def decompose(self, weight: torch.Tensor, rank: Rank, stats: CalibrationStats | None = None) -> MethodResult:
        W = check_weight(weight, self.name)
        stats = self.check_stats(stats)
        r, _ = self.ranks_for(rank, *W.shape)
        fallbacks: list[str] = []
        sc = self.scaled(W, stats, fallbacks)
        cut = scaled_truncation(sc.matrix, self.truncate(sc.matrix, r), unscale_left=sc.unscale_left,
                                unscale_right=sc.unscale_right)
        f = cut.factors
        if not (bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all())):
            why = f" ({sc.note})" if sc.note else ""
            raise DecompositionError(f"{self.name}: factors of the {W.shape[0]}x{W.shape[1]} weight are not "
                                     f"finite{why}")
        extra = {self.error_name: cut.residual} if self.error_name else {}
        return MethodResult(f, fallbacks, cut.solver, extra)

    def singular_values(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> torch.Tensor:
        W = check_weight(weight, self.name)
        return singular_values(self.scaled(W, stats, []).matrix)

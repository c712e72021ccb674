"""The interface every decomposition method implements, the method registry, and error measures.

A method turns one weight matrix W (out_features × in_features, as stored by ``nn.Linear``) into factors
W ≈ A · G · Bᵀ (:class:`Factors`). Data-aware methods (ASVD, SVD-LLM, FWSVD) also read per-layer
:class:`CalibrationStats`; each method declares which fields it ``needs`` so the calibration step collects
only those. Methods register themselves by name on import (TensorLy style), so adding a method is one new
class in one file plus one import line in :mod:`rankwise.decomposition`.

Settings: each method declares a frozen :class:`MethodConfig` dataclass (``config_class``), as peft pairs
a config with each tuner. Plans and the CLI give settings by name (``{name: asvd, alpha: 0.25}``,
``--method-arg alpha=0.25``); :meth:`MethodConfig.from_settings` checks them (unknown keys, types, ranges;
one-line :class:`~rankwise.errors.PlanError` naming the field) and fills in the defaults, which equal the
behaviour before settings existed. A new setting is one annotated line with a :func:`setting` default.

Numerics: methods work in float32 (float64 for Gram/Cholesky work) whatever the weight's dtype, and return
float32 factors; the caller casts to the model's dtype. A weight with NaN/Inf raises
:class:`~rankwise.errors.DecompositionError` — a method never returns an un-decomposed or random layer.
"""

from __future__ import annotations

import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import torch

from rankwise.calibration.stats import CalibrationStats
from rankwise.decomposition.solvers import KRYLOV_OVERSAMPLE, SOLVERS, SVDResult, truncated_svd
from rankwise.design.plan import MethodSpec
from rankwise.errors import DecompositionError, PlanError

Form = Literal["three_factor", "two_factor"]
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
class MethodResult:
    """What a method returns: the factors plus an honest record of how they were obtained."""

    factors: Factors
    fallbacks: list[str] = field(default_factory=list)  # human-readable notes of fallbacks taken
    solver: str = "exact"  # "exact" | "randomized" | ...
    extra: dict[str, float] = field(default_factory=dict)  # e.g. whitened error


# --- settings -----------------------------------------------------------------------------------------------
_KIND_TEXT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def setting(default: Any, rule: str = "", check: Callable[[Any], bool] | None = None,
            choices: tuple[str, ...] = ()) -> Any:
    """A config field with its constraint: ``check`` accepts a value of the field's type, ``rule`` says in
    words what it accepts (the error quotes it: ``must be a number in (0, 1]``); ``choices`` lists the
    allowed strings (matched case-insensitively)."""
    return field(default=default, metadata={"rule": rule, "check": check, "choices": choices})


@dataclass(frozen=True)
class MethodConfig:
    """A method's settings; subclasses are frozen dataclasses whose fields are bool, int, float or str.

    The defaults are the method's behaviour with nothing said. Adding a setting to every method (error
    compensation, say) is one line here, e.g. ``compensate: bool = setting(False)``; to one method, one
    line in its config subclass. Values given as strings (the CLI's ``KEY=VALUE``, YAML's ``1e-6``) are
    parsed by the field's type.
    """

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None = None, where: str = "") -> Self:
        """The config with ``settings`` applied over the defaults; ``where`` prefixes the field in errors
        (``overrides[0].method.``), so a bad value reads ``overrides[0].method.alpha: must be ...``."""
        settings = dict(settings or {})
        known = {f.name: f for f in fields(cls)}
        for key in settings:
            if key not in known:
                names = ", ".join(sorted(known)) or "none"
                raise PlanError(f"{where}{key}: unknown setting (known: {names})")
        types = typing.get_type_hints(cls)
        values = {key: _checked(value, types[key], known[key].metadata, f"{where}{key}")
                  for key, value in settings.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, defaults included: what reports and checkpoints record."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _checked(value: Any, kind: type, meta: Mapping[str, Any], where: str) -> Any:
    """``value`` as a ``kind`` (parsing strings) that passes the field's constraint, or a PlanError."""
    choices: tuple[str, ...] = meta.get("choices", ())
    rule = meta.get("rule") or (f"one of {', '.join(choices)}" if choices else _KIND_TEXT.get(kind, str(kind)))
    bad = PlanError(f"{where}: must be {rule}, got {value!r}")
    parsed = _parse(value, kind)
    if parsed is None:
        raise bad
    if choices:
        parsed = parsed.strip().lower()
        if parsed not in choices:
            raise bad
    check = meta.get("check")
    if check is not None and not check(parsed):
        raise bad
    return parsed


def _parse(value: Any, kind: type) -> Any:
    """``value`` converted to ``kind`` (bool, int, float, str), or None when it is not one."""
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        return True if text in _TRUE else False if text in _FALSE else None
    if isinstance(value, bool):
        return None  # true/false is not a number
    if kind is int:
        if isinstance(value, int):
            return value
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None
    if kind is float:
        try:
            number = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            return None
        return number if number is not None and math.isfinite(number) else None
    if kind is str:
        return value if isinstance(value, str) else None
    return None


@dataclass(frozen=True)
class SolverConfig(MethodConfig):
    """Settings of the truncated-SVD solver every built-in method runs (see :mod:`.solvers`)."""

    solver: str = setting("auto", choices=SOLVERS)  # auto: Krylov for tiny ranks of large matrices, else gram
    oversample: int = setting(KRYLOV_OVERSAMPLE, "an integer >= 0", lambda v: v >= 0)  # Krylov block = r + this


C = TypeVar("C", bound=MethodConfig)


class DecompositionMethod(ABC, Generic[C]):
    """One way of factorizing a weight; a subclass with a ``name`` registers itself (:func:`register_method`).

    The class attributes below can be given as class keywords, and the settings type as the type argument:
    ``class ASVD(ScaledSVDMethod[ASVDConfig], name="asvd", summary="...")`` sets ``name``, ``summary`` and
    ``config_class = ASVDConfig``. An instance carries its settings in ``config`` (an instance of the class's
    ``config_class``): ``ASVD(alpha=0.25)``, ``ASVD(ASVDConfig(alpha=0.25))`` and ``get_method("asvd",
    alpha=0.25)`` agree.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # CalibrationStats fields it reads, e.g. {"gram"}
    form: ClassVar[Form] = "two_factor"  # "three_factor": params r1·m + r1·r2 + r2·n; "two_factor": r·(m + n)
    summary: ClassVar[str] = ""  # one line for listings
    config_class: ClassVar[type[MethodConfig]] = MethodConfig  # the settings it takes
    config: C

    def __init_subclass__(cls, **declared: Any) -> None:
        for key, value in declared.items():
            if not any(key in vars(c).get("__annotations__", {}) for c in cls.__mro__):
                raise TypeError(f"{cls.__name__}: unknown class keyword '{key}'")
            setattr(cls, key, value)
        super().__init_subclass__()
        for base in vars(cls).get("__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], MethodConfig):
                cls.config_class = args[0]
        if "name" in vars(cls):
            register_method(cls)

    def __init__(self, config: MethodConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = self.config_class.from_settings(settings, f"{self.name}.")
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        elif settings:
            config = self.config_class.from_settings({**config.to_dict(), **settings}, f"{self.name}.")
        self.config = config

    def settings(self) -> dict[str, Any]:
        """The method's name and every setting, defaults included (what reports record)."""
        return {"name": self.name, **self.config.to_dict()}

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


S = TypeVar("S", bound=SolverConfig)


class SolverMethod(DecompositionMethod[S]):
    """A method built on the truncated-SVD solver (every built-in one): its settings include the solver's
    (:class:`SolverConfig`, or the subclass its type argument names)."""

    config_class: ClassVar[type[SolverConfig]] = SolverConfig

    def truncate(self, matrix: torch.Tensor, rank: int) -> SVDResult:
        """Top-``rank`` singular triplets of ``matrix`` by the solver the settings name."""
        return truncated_svd(matrix, rank, self.config.solver, self.config.oversample)


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


def method_class(name: str, where: str = "") -> type[DecompositionMethod]:
    """The registered class of method ``name`` (case-insensitive); unknown names raise a one-line PlanError."""
    cls = _REGISTRY.get(str(name).strip().lower())
    if cls is None:
        raise PlanError(f"{where}unknown method '{name}' (known: {', '.join(available_methods())})")
    return cls


def get_method(method: str | MethodSpec, **settings: Any) -> DecompositionMethod:
    """A fresh instance of a method, configured: by name with keyword settings, or from a plan's
    :class:`~rankwise.design.plan.MethodSpec` (whose settings errors then name the plan field).

    Unknown names, unknown settings and bad values raise a one-line PlanError.
    """
    if isinstance(method, MethodSpec):
        cls = method_class(method.name, f"{method.where}: ")
        given = {**dict(method.settings), **settings}
        return cls(cls.config_class.from_settings(given, f"{method.where}."))
    cls = method_class(method)
    return cls(cls.config_class.from_settings(settings, f"{cls.name}."))


def method_settings(method: str | MethodSpec | Mapping[str, Any]) -> dict[str, Any]:
    """``{"name": ..., **every setting}`` of a method as a plan writes it (name, mapping or MethodSpec)."""
    spec = method if isinstance(method, MethodSpec) else MethodSpec.parse(method, "method")
    return get_method(spec).settings()


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


# --- error measures ---------------------------------------------------------------------------------------
#: The error metrics work on float64 blocks of W's rows, at least this many rows (matrix products stay
#: efficient) and about ERROR_BLOCK_ELEMENTS elements: they never hold whole float64 copies of W (at 7B a
#: 4096 × 11008 weight is 360 MB a copy, and the weighted error used to hold five).
ERROR_BLOCK_ROWS = 64
ERROR_BLOCK_ELEMENTS = 1 << 16


def _row_step(weight: torch.Tensor) -> int:
    return max(ERROR_BLOCK_ROWS, ERROR_BLOCK_ELEMENTS // max(1, weight.shape[1]))


def _blocks(weight: torch.Tensor, approx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(W rows, Ŵ − W rows) in float64, a block at a time (the sign of E does not matter to the norms)."""
    step = _row_step(weight)
    for i in range(0, weight.shape[0], step):
        w = weight[i:i + step].detach().to(torch.float64)
        e = approx[i:i + step].detach().to(torch.float64)
        e -= w
        yield w, e


def _sq(x: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1), x.reshape(-1)))


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, in float64, a block of rows at a time."""
    w_sq = e_sq = 0.0
    for w, e in _blocks(weight, approx):
        w_sq += _sq(w)
        e_sq += _sq(e)
    return math.sqrt(e_sq / w_sq) if w_sq > 0 else math.sqrt(e_sq)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, stats: CalibrationStats | torch.Tensor) -> float:
    """Activation-weighted error sqrt(tr(E·XᵀX·Eᵀ) / tr(W·XᵀX·Wᵀ)) with E = W − Ŵ, a block of rows at a time.

    This is ‖(W − Ŵ)·S‖_F / ‖W·S‖_F for XᵀX = S·Sᵀ, i.e. the relative error of the layer's *outputs* on the
    calibration tokens (‖X·Eᵀ‖ / ‖X·Wᵀ‖), which is what SVD-LLM minimizes. ``stats`` may be the Gram itself.
    """
    gram = stats if isinstance(stats, torch.Tensor) else stats.gram
    if gram is None:
        raise DecompositionError("weighted_error needs calibration statistics 'gram'")
    g = gram.detach().to(torch.float64)
    num = den = 0.0
    for w, e in _blocks(weight, approx):
        num += float(torch.dot((e @ g).reshape(-1), e.reshape(-1)))
        den += float(torch.dot((w @ g).reshape(-1), w.reshape(-1)))
    num = max(num, 0.0)  # rounding can make a ~0 quadratic form slightly negative
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)

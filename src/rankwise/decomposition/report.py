"""What a decomposition did, target by target and for the whole model: the record users and tools read.

Every number is measured on the model itself: parameter and byte counts come from ``model.parameters()``
(tied embeddings counted once) before and after, errors from the factors actually stored in the model
(after the cast to its dtype). Conventions are stated in the fields' names: ``reduction_pct`` is the share
of the *whole model's* parameters removed, not of the decomposed matrices alone.

Method settings are recorded in full, defaults included (``plan`` spells out every method as
``{name: ..., setting: value, ...}`` and each target has ``method_settings``), so a report still says what
ran if a default changes later.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rankwise.decomposition import method_settings
from rankwise.design.plan import MethodSpec
from rankwise.errors import PlanError


@dataclass
class TargetReport:
    """One planned target: decomposed (with its ranks, form, size and errors) or kept dense (and why).

    ``method`` may be given as the plan's :class:`MethodSpec`; it is stored as the method's name, with its
    full settings in ``method_settings``.
    """

    layer: int
    role: str
    name: str
    method: str  # the method's name
    shape: tuple[int, int]  # (out_features m, in_features n)
    rank_spec: str  # as the plan wrote it: "1", "0.25", "energy:0.9"
    ranks: tuple[int, int] | None  # (r1, r2) actually used; None when kept dense before resolving
    form: str  # "three_factor", "two_factor" or "dense"
    params_before: int
    params_after: int
    rel_error: float | None  # ‖W − Ŵ‖_F / ‖W‖_F
    weighted_error: float | None  # ‖(W − Ŵ)S‖_F / ‖WS‖_F with XᵀX = SSᵀ (calibration inputs), when a Gram exists
    fallbacks: list[str] = field(default_factory=list)
    solver: str = ""
    seconds: float = 0.0
    kept_dense: bool = False
    reason: str = ""
    method_settings: dict[str, Any] = field(default_factory=dict)  # name and every setting, defaults included

    def __post_init__(self) -> None:
        if isinstance(self.method, MethodSpec):
            if not self.method_settings:
                self.method_settings = method_settings(self.method)
            self.method = self.method.name

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["ranks"] = None if self.ranks is None else list(self.ranks)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetReport:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        kw["shape"] = tuple(kw["shape"])
        kw["ranks"] = None if kw.get("ranks") is None else tuple(kw["ranks"])
        return cls(**kw)


@dataclass
class DecompositionReport:
    """The whole run: per-target records, whole-model size before and after, calibration used."""

    model: str
    plan: dict[str, Any]
    fold: str
    targets: list[TargetReport]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    calibration: dict[str, Any] | None = None
    dtype: str = ""

    def __post_init__(self) -> None:
        self.plan = spelled_out(self.plan)

    # --- derived totals --------------------------------------------------------------------------------
    @property
    def decomposed(self) -> list[TargetReport]:
        return [t for t in self.targets if not t.kept_dense]

    @property
    def kept_dense(self) -> list[TargetReport]:
        return [t for t in self.targets if t.kept_dense]

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def reduction_pct(self) -> float:
        """Share of the whole model's parameters removed, in percent."""
        return 100.0 * self.params_removed / self.params_before if self.params_before else 0.0

    @property
    def mean_rel_error(self) -> float | None:
        errs = [t.rel_error for t in self.decomposed if t.rel_error is not None]
        return sum(errs) / len(errs) if errs else None

    @property
    def mean_weighted_error(self) -> float | None:
        errs = [t.weighted_error for t in self.decomposed if t.weighted_error is not None]
        return sum(errs) / len(errs) if errs else None

    def summary(self) -> dict[str, Any]:
        """The headline numbers, labelled."""
        return {
            "targets_planned": len(self.targets),
            "targets_decomposed": len(self.decomposed),
            "targets_kept_dense": len(self.kept_dense),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_removed": self.params_removed,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "reduction_pct_of_whole_model": self.reduction_pct,
            "mean_rel_error": self.mean_rel_error,
            "mean_weighted_error": self.mean_weighted_error,
            "seconds": self.seconds,
        }

    # --- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "plan": self.plan,
            "fold": self.fold,
            "summary": _finite(self.summary()),
            "calibration": self.calibration,
            "targets": [_finite(t.to_dict()) for t in self.targets],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecompositionReport:
        return cls(model=data["model"], plan=data["plan"], fold=data["fold"],
                   targets=[TargetReport.from_dict(t) for t in data["targets"]],
                   params_before=data["params_before"], params_after=data["params_after"],
                   bytes_before=data["bytes_before"], bytes_after=data["bytes_after"],
                   seconds=data["seconds"], calibration=data.get("calibration"), dtype=data.get("dtype", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def spelled_out(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan dict with every method written as ``{name, **all settings}`` (defaults filled in).

    A method this installation does not know (a report from elsewhere) is kept as written.
    """
    def full(method: Any) -> Any:
        try:
            return method_settings(method)
        except PlanError:
            return method

    out = dict(plan)
    if "method" in out:
        out["method"] = full(out["method"])
    if isinstance(out.get("overrides"), list):
        out["overrides"] = [{**r, "method": full(r["method"])} if isinstance(r, dict) and "method" in r else r
                            for r in out["overrides"]]
    return out


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Inf: non-finite floats become None (and are never produced for real errors)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

"""Decomposition plans: which targets to decompose, and how.

A *target* is a (layer, role) pair; a *plan* maps targets to a :class:`DecompSpec` (method, rank, force).
Plans are written by people in YAML or JSON::

    method: tucker          # default method for every rule
    rank: 1                 # int rank, parameter fraction in (0, 1), or "energy:0.9"
    layers: [2, 17, 31]     # or "20-29", "2,17,31", "all"
    tensors: all            # or [mlp], [q, k, v, o]
    overrides:              # later rules win; a rule with skip: true leaves its targets dense
      - {layers: "20-29", tensors: [down], rank: 0.5, method: svd}
      - {layers: [0, 1], tensors: [mlp], method: {name: asvd, alpha: 0.25, solver: gram}}
      - {layers: [17], tensors: [q], skip: true}

A method is a name (case-insensitive) or a mapping of its name and settings (:class:`MethodSpec`); a
rule's method replaces the inherited one whole, settings included. The settings are checked against the
method's config (in :mod:`rankwise.decomposition`) when the plan is applied.

Parsing checks the plan's own fields; :meth:`Plan.resolve` checks it against a model (layers in range,
roles that exist, exact ranks within 1..min(m, n)). Every error is a one-line :class:`PlanError` naming
the field. ``Plan.from_dict(p.to_dict()) == p`` holds, so plans round-trip through YAML and JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from rankwise.design.ranks import RankSpec, parse_rank, resolve_rank
from rankwise.design.selectors import LayerSelector, TensorSelector, parse_layers, parse_tensors
from rankwise.errors import PlanError
from rankwise.models.adapters import TargetInfo

Target = tuple[int, str]
FOLD_CHOICES = ("auto", True, False)
Setting = bool | int | float | str


@dataclass(frozen=True)
class MethodSpec:
    """A decomposition method as a plan names it: its name (lower case) and the settings written with it.

    Plans stay terse: only the settings given are kept (sorted by key), so ``to_plain()`` writes back what
    was read. Checking them and filling in defaults is the method config's job, a layer up; ``where`` is
    the plan field the spec came from (``overrides[0].method``), so those checks can name it.
    """

    name: str
    settings: tuple[tuple[str, Setting], ...] = ()
    where: str = field(default="method", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip().lower())
        object.__setattr__(self, "settings", tuple(sorted(self.settings)))

    @classmethod
    def parse(cls, value: Any, field_name: str = "method") -> MethodSpec:
        """From a name (``asvd``) or a mapping (``{name: asvd, alpha: 0.5}``); a one-line PlanError if
        neither, naming ``field_name``."""
        if isinstance(value, MethodSpec):
            return replace(value, where=field_name)
        if isinstance(value, Mapping):
            if "name" not in value:
                raise PlanError(f"{field_name}.name: missing (write e.g. {{name: asvd, alpha: 0.5}})")
            name, settings = value["name"], {k: v for k, v in value.items() if k != "name"}
        else:
            name, settings = value, {}
        if not isinstance(name, str) or not name.strip():
            where = f"{field_name}.name" if isinstance(value, Mapping) else field_name
            raise PlanError(f"{where}: expected a method name, got {name!r}")
        for key, setting in settings.items():
            if not isinstance(key, str):
                raise PlanError(f"{field_name}: setting names must be strings, got {key!r}")
            if not isinstance(setting, Setting):
                raise PlanError(f"{field_name}.{key}: expected a number, a string or true/false, got {setting!r}")
        return cls(name, tuple(settings.items()), where=field_name)

    def to_plain(self) -> str | dict[str, Any]:
        """The name alone when no settings were given, else ``{name: ..., **settings}``."""
        return self.name if not self.settings else {"name": self.name, **dict(self.settings)}

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class DecompSpec:
    """How one target is decomposed: method (name and settings), rank spec, and whether to factorize above
    break-even."""

    method: MethodSpec
    rank: RankSpec
    force: bool = False


@dataclass(frozen=True)
class Rule:
    """Selectors plus the settings they apply; ``None`` settings inherit the plan's defaults."""

    layers: LayerSelector
    tensors: TensorSelector = "all"
    method: MethodSpec | None = None
    rank: RankSpec | None = None
    force: bool | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if self.method is not None and not isinstance(self.method, MethodSpec):
            object.__setattr__(self, "method", MethodSpec.parse(self.method))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": _plain(self.layers), "tensors": _plain(self.tensors)}
        if self.method is not None:
            out["method"] = self.method.to_plain()
        if self.rank is not None:
            out["rank"] = self.rank.to_plain()
        if self.force is not None:
            out["force"] = self.force
        if self.skip:
            out["skip"] = True
        return out


_RULE_KEYS = {"layers", "tensors", "method", "rank", "force", "skip"}
_PLAN_KEYS = {"method", "rank", "layers", "tensors", "force", "fold", "overrides", "name", "compensate", "remove_layers"}
#: ``compensate``: false, true (refit each kept output factor by least squares on calibration inputs) or
#: "sequential" (calibrate each layer on the already-compressed model's inputs); see decomposition.compensation.
COMPENSATE_CHOICES = (False, True, "sequential")


@dataclass(frozen=True)
class Plan:
    """A whole decomposition plan: defaults, a base rule, and overrides applied in order."""

    layers: LayerSelector = "all"
    tensors: TensorSelector = "all"
    method: MethodSpec = MethodSpec("tucker")
    rank: RankSpec = field(default_factory=lambda: RankSpec("exact", 1))
    force: bool = False
    fold: str | bool = "auto"
    overrides: tuple[Rule, ...] = ()
    name: str | None = None
    compensate: bool | str = False  # error compensation after truncation (COMPENSATE_CHOICES)
    remove_layers: tuple[int, ...] = ()  # blocks dropped whole (layer removal); their targets are not decomposed

    def __post_init__(self) -> None:
        if not isinstance(self.method, MethodSpec):
            object.__setattr__(self, "method", MethodSpec.parse(self.method))

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError("plan: expected a mapping of fields (method, rank, layers, tensors, overrides)")
        unknown = sorted(set(data) - _PLAN_KEYS, key=str)  # keys of any YAML type
        if unknown:
            raise PlanError(f"plan: unknown field '{unknown[0]}' (known: {', '.join(sorted(_PLAN_KEYS))})")
        method = MethodSpec.parse(data.get("method", "tucker"), "method")
        rank = parse_rank(data.get("rank", 1), "rank")
        force = _check_bool(data.get("force", False), "force")
        fold = data.get("fold", "auto")
        if fold not in FOLD_CHOICES or (isinstance(fold, int) and not isinstance(fold, bool)):
            raise PlanError(f"fold: {fold!r} must be auto, true or false")
        layers = _check_layers(data.get("layers", "all"), "layers")
        tensors = _check_tensors(data.get("tensors", "all"), "tensors")
        raw_overrides = data.get("overrides") or []
        if not isinstance(raw_overrides, list):
            raise PlanError("overrides: expected a list of rules")
        overrides = tuple(_rule_from_dict(r, f"overrides[{i}]") for i, r in enumerate(raw_overrides))
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise PlanError("name: expected a string")
        compensate = data.get("compensate", False)
        if compensate not in COMPENSATE_CHOICES or (isinstance(compensate, int) and not isinstance(compensate, bool)):
            raise PlanError(f"compensate: {compensate!r} must be false, true or sequential")
        remove = data.get("remove_layers") or []
        remove_layers = tuple(parse_layers(remove, None, "remove_layers")) if remove else ()
        return cls(layers=layers, tensors=tensors, method=method, rank=rank, force=force, fold=fold,
                   overrides=overrides, name=name, compensate=compensate, remove_layers=remove_layers)

    @classmethod
    def simple(cls, layers: LayerSelector = "all", tensors: TensorSelector = "all", rank: object = 1,
               method: str | Mapping[str, Any] | MethodSpec = "tucker", force: bool = False,
               fold: str | bool = "auto") -> Plan:
        """A one-rule plan, as the CLI's ``--layers --tensors --rank --method --method-arg`` flags describe."""
        return cls.from_dict({"layers": layers, "tensors": tensors, "rank": rank, "method": method,
                              "force": force, "fold": fold})

    @classmethod
    def from_text(cls, text: str, fmt: str = "yaml") -> Plan:
        """A plan as a person writes it: it must say what it decomposes. An empty text, or one without
        ``layers`` and ``tensors`` (each a selection or ``all``), is an error rather than the defaults: a
        plan that silently decomposes every target of the model is never what its author meant."""
        try:
            data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise PlanError(f"plan: not valid {fmt.upper()} ({message[:200]})") from None
        if data is None or (isinstance(data, Mapping | list | str) and not data):
            raise PlanError("plan: empty; say what to decompose, e.g. layers: [2, 17], tensors: all, rank: 1")
        plan = cls.from_dict(data)  # the fields' own errors first
        missing = [key for key in ("layers", "tensors") if key not in data]
        if missing:
            raise PlanError(f"plan: no '{missing[0]}' field; a plan names its layers (e.g. [2, 17], 20-29) "
                            f"and tensors (e.g. [q, k], mlp), or says all")
        return plan

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PlanError(f"plan file {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
        except UnicodeDecodeError as exc:
            raise PlanError(f"plan file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                            f"{exc.start}); save it as UTF-8") from None
        return cls.from_text(text, "json" if path.suffix == ".json" else "yaml")

    # --- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out.update({"method": self.method.to_plain(), "rank": self.rank.to_plain(), "layers": _plain(self.layers),
                    "tensors": _plain(self.tensors)})
        if self.force:
            out["force"] = True
        if self.fold != "auto":
            out["fold"] = self.fold
        if self.compensate:
            out["compensate"] = self.compensate
        if self.remove_layers:
            out["remove_layers"] = list(self.remove_layers)
        if self.overrides:
            out["overrides"] = [r.to_dict() for r in self.overrides]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())

    # --- resolution against a model -------------------------------------------------------------------------
    def rules(self) -> Iterable[tuple[str, Rule]]:
        """The base rule then the overrides, each with the field prefix its errors should name."""
        yield "", Rule(layers=self.layers, tensors=self.tensors)
        for i, rule in enumerate(self.overrides):
            yield f"overrides[{i}].", rule

    def methods(self) -> Iterable[MethodSpec]:
        """Every method the plan names (the default, then each override's), to check before applying it."""
        yield self.method
        for rule in self.overrides:
            if rule.method is not None:
                yield rule.method

    def resolve(self, targets: Sequence[TargetInfo], roles: Sequence[str],
                groups: Mapping[str, Sequence[str]] | None = None,
                known_methods: Iterable[str] | None = None) -> dict[Target, DecompSpec]:
        """The spec of every selected target of a model, validating the plan against it."""
        by_target = {(t.layer, t.role): t for t in targets}
        n_layers = 1 + max((t.layer for t in targets), default=-1)
        methods = set(known_methods) if known_methods is not None else None
        chosen: dict[Target, DecompSpec] = {}
        for prefix, rule in self.rules():
            layers = parse_layers(rule.layers, n_layers, f"{prefix}layers")
            roles_sel = parse_tensors(rule.tensors, roles, groups, f"{prefix}tensors")
            method = rule.method or self.method
            if methods is not None and method.name not in methods:
                raise PlanError(f"{prefix or ''}method: unknown method '{method.name}' "
                                f"(known: {', '.join(sorted(methods))})")
            for layer in layers:
                for role in roles_sel:
                    key = (layer, role)
                    if key not in by_target:  # a role this block lacks (cross-attention in an encoder block)
                        continue
                    if rule.skip:
                        chosen.pop(key, None)
                        continue
                    base = chosen.get(key)
                    rank = rule.rank or (base.rank if base else self.rank)
                    force = rule.force if rule.force is not None else (base.force if base else self.force)
                    meth = rule.method or (base.method if base else self.method)
                    info = by_target[key]
                    if rank.kind == "exact":
                        resolve_rank(rank, info.out_features, info.in_features,
                                     field=f"{prefix}rank (layer {layer} {role})")
                    chosen[key] = DecompSpec(method=meth, rank=rank, force=force)
        if self.remove_layers:  # a removed block's targets are gone, not decomposed
            removed = set(parse_layers(list(self.remove_layers), n_layers, "remove_layers"))
            chosen = {k: v for k, v in chosen.items() if k[0] not in removed}
        return dict(sorted(chosen.items(), key=lambda kv: (kv[0][0], roles.index(kv[0][1]))))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_bool(value: Any, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(f"{field_name}: expected true or false, got {value!r}")
    return value


def _check_layers(value: Any, field_name: str) -> LayerSelector:
    parse_layers(value, None, field_name)  # syntax only; range is checked against the model in resolve()
    return tuple(value) if isinstance(value, list) else value  # type: ignore[return-value]


def _check_tensors(value: Any, field_name: str) -> TensorSelector:
    parse_tensors(value, None, None, field_name)
    return tuple(value) if isinstance(value, list) else value  # type: ignore[return-value]


def _rule_from_dict(data: Any, prefix: str) -> Rule:
    if not isinstance(data, Mapping):
        raise PlanError(f"{prefix}: expected a mapping with layers, tensors, rank, method")
    unknown = sorted(set(data) - _RULE_KEYS, key=str)  # keys of any YAML type
    if unknown:
        raise PlanError(f"{prefix}: unknown field '{unknown[0]}' (known: {', '.join(sorted(_RULE_KEYS))})")
    if "layers" not in data:
        raise PlanError(f"{prefix}.layers: missing (say which layers the override applies to)")
    return Rule(
        layers=_check_layers(data["layers"], f"{prefix}.layers"),
        tensors=_check_tensors(data.get("tensors", "all"), f"{prefix}.tensors"),
        method=MethodSpec.parse(data["method"], f"{prefix}.method") if "method" in data else None,
        rank=parse_rank(data["rank"], f"{prefix}.rank") if "rank" in data else None,
        force=_check_bool(data["force"], f"{prefix}.force") if "force" in data else None,
        skip=_check_bool(data.get("skip", False), f"{prefix}.skip"),
    )

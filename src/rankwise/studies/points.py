"""Design points: the paper's sweeps as presets, explicit axes and plans, expanded against a model.

A *design point* is one thing a trial measures: a decomposition plan (``kind="decompose"``) or a set of
blocks dropped (``kind="remove"``), with the sweep it belongs to, a short label and the sweep's natural x
value (layer count, rank, layer index, spacing). Presets derive the layer count L and the roles from the
model's architecture adapter, so they work on any model rankwise loads:

* ``layer-count``: rank 1 on all tensors of n evenly spaced layers (n = 1..L by default; the paper's
  Fig. 9/10). "Evenly spaced" = the centres of n equal bins of the L layers, ``floor((2i+1)L/(2n))``.
* ``layer-removal``: the same layer sets as ``layer-count``, dropped instead of decomposed.
* ``tensor-sensitivity``: each role alone across all layers; each role alone in one layer (default the
  middle one); attention-only and MLP-only across all layers.
* ``rank-sweep``: ranks (default 1, 8, 32, 25%, 50% of parameters) on fixed layers (default 3 evenly spaced).
* ``layer-density``: ``count`` (5) layers at spacing s for s in 6, 5, 4, 3, 2, 1, centred in the model
  (the adjacency finding).
* ``single-layer``: each layer alone at rank 1 (the early-layer finding).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rankwise.errors import RankwiseError
from rankwise.studies.spec import PRESETS, SpecError, _err, _mapping, _pos_int, _str


@dataclass(frozen=True)
class DesignPoint:
    """One point of a study: what to do to the model, and how to label it."""

    sweep: str
    label: str
    x: Any
    kind: str  # "decompose" | "remove"
    plan: dict[str, Any] | None = None
    remove_layers: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "label": self.label, "x": self.x, "kind": self.kind,
                "plan": self.plan if self.kind == "decompose" else {"remove_layers": list(self.remove_layers or ())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DesignPoint:
        if data["kind"] == "remove":
            return cls(sweep=data["sweep"], label=data["label"], x=data.get("x"), kind="remove",
                       remove_layers=tuple(data["plan"]["remove_layers"]))
        return cls(sweep=data["sweep"], label=data["label"], x=data.get("x"), kind="decompose", plan=data["plan"])


_COMMON = {"preset", "rank", "method", "tensors"}
_PRESET_KEYS: dict[str, set[str]] = {
    "layer-count": _COMMON | {"n"},
    "layer-removal": {"preset", "n"},
    "tensor-sensitivity": _COMMON | {"layer"},
    "rank-sweep": _COMMON | {"ranks", "layers"},
    "layer-density": _COMMON | {"spacings", "count"},
    "single-layer": _COMMON | {"layers"},
}
_AXES = {"layers", "tensors", "rank", "method"}


def _int_list(value: Any, path: str, minimum: int = 0) -> list[int]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            where = f"{path}[{i}]" if isinstance(value, list) else path
            raise _err(where, f"must be an integer >= {minimum}, got {v!r}")
        out.append(v)
    if not out:
        raise _err(path, "must not be empty")
    return out


def check_grid_item(item: Any, path: str) -> dict[str, Any]:
    """Shape checks of one grid entry (no model needed); returns it as a plain dict."""
    from rankwise.design.plan import Plan
    from rankwise.design.ranks import parse_rank

    if isinstance(item, str):
        item = {"preset": item}
    if not isinstance(item, Mapping):
        raise _err(path, "must be a preset ({preset: NAME, ...}), axes ({axes: {...}}) or a plan ({plan: {...}})")
    if "preset" in item:
        preset = _str(item["preset"], f"{path}.preset", PRESETS)
        data = _mapping(item, path, _PRESET_KEYS[preset])
        if "rank" in data:
            _rank(data["rank"], f"{path}.rank", parse_rank)
        if "method" in data:
            _method(data["method"], f"{path}.method")
        for key in ("n", "layers", "spacings"):
            if key in data:
                _int_list(data[key], f"{path}.{key}", minimum=1 if key in ("n", "spacings") else 0)
        for key in ("count", "layer"):
            if key in data:
                (_pos_int if key == "count" else _int_list)(data[key], f"{path}.{key}")
        if "ranks" in data:
            if not isinstance(data["ranks"], list) or not data["ranks"]:
                raise _err(f"{path}.ranks", "must be a non-empty list of ranks")
            for i, r in enumerate(data["ranks"]):
                _rank(r, f"{path}.ranks[{i}]", parse_rank)
        return data
    if "axes" in item:
        data = _mapping(item, path, {"axes", "sweep"})
        axes = _mapping(data["axes"], f"{path}.axes", _AXES)
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise _err(f"{path}.axes.{key}", "must be a non-empty list of values")
        for i, r in enumerate(axes.get("rank", [])):
            _rank(r, f"{path}.axes.rank[{i}]", parse_rank)
        for i, m in enumerate(axes.get("method", [])):
            _method(m, f"{path}.axes.method[{i}]")
        if "sweep" in data:
            _str(data["sweep"], f"{path}.sweep")
        return data
    if "plan" in item:
        data = _mapping(item, path, {"plan", "label", "sweep", "x"})
        try:
            Plan.from_dict(data["plan"])
        except RankwiseError as exc:
            raise _err(f"{path}.plan", str(exc)) from None
        return data
    raise _err(path, "needs one of preset, axes or plan")


def _rank(value: Any, path: str, parse: Any) -> None:
    try:
        parse(value, path)
    except RankwiseError as exc:
        raise _err(path, str(exc).split(": ", 1)[-1]) from None


def _method(value: Any, path: str) -> None:
    from rankwise.decomposition import available_methods

    _str(value, path, tuple(available_methods()))


# --------------------------------------------------------------------------------------------- expansion


def evenly_spaced(n: int, n_layers: int) -> list[int]:
    """The centres of n equal bins of the layers: 1 -> [L/2], L -> all layers."""
    return sorted({(2 * i + 1) * n_layers // (2 * n) for i in range(n)})


def dense_layers_at_spacing(count: int, spacing: int, n_layers: int) -> list[int]:
    """``count`` layers ``spacing`` apart, centred in the model."""
    span = (count - 1) * spacing + 1
    start = (n_layers - span) // 2
    return [start + i * spacing for i in range(count)]


def _rank_label(rank: Any) -> str:
    return f"{round(rank * 100)}%" if isinstance(rank, float) and rank < 1 else str(rank)


def _plan(layers: Any, tensors: Any, rank: Any, method: str) -> dict[str, Any]:
    return {"method": method, "rank": rank, "layers": layers, "tensors": tensors}


def expand_item(item: Mapping[str, Any], n_layers: int, roles: Sequence[str], path: str) -> list[DesignPoint]:
    """The design points of one grid entry for a model with ``n_layers`` blocks and these roles."""
    if "plan" in item:
        plan = dict(item["plan"])
        return [DesignPoint(sweep=item.get("sweep", "grid"), label=item.get("label") or plan.get("name") or "plan",
                            x=item.get("x"), kind="decompose", plan=plan)]
    if "axes" in item:
        axes = item["axes"]
        keys = [k for k in ("layers", "tensors", "rank", "method") if k in axes]
        out = []
        for combo in itertools.product(*(axes[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            plan = _plan(values.get("layers", "all"), values.get("tensors", "all"), values.get("rank", 1),
                         values.get("method", "tucker"))
            label = " ".join(f"{k}={_short(v)}" for k, v in values.items())
            out.append(DesignPoint(sweep=item.get("sweep", "grid"), label=label, x=None, kind="decompose", plan=plan))
        return out
    preset = item["preset"]
    rank = item.get("rank", 1)
    method = item.get("method", "tucker")
    tensors = item.get("tensors", "all")

    def check_layers(layers: list[int], where: str) -> list[int]:
        bad = [x for x in layers if x >= n_layers]
        if bad:
            raise _err(where, f"layer {bad[0]} is out of range 0..{n_layers - 1}")
        return layers

    if preset in ("layer-count", "layer-removal"):
        ns = _int_list(item.get("n", list(range(1, n_layers + 1))), f"{path}.n", minimum=1)
        too_big = [n for n in ns if n > n_layers]
        if too_big:
            raise _err(f"{path}.n", f"{too_big[0]} layers asked, the model has {n_layers}")
        if preset == "layer-count":
            return [DesignPoint("layer-count", f"n={n}", n, "decompose",
                                plan=_plan(evenly_spaced(n, n_layers), tensors, rank, method)) for n in ns]
        return [DesignPoint("layer-removal", f"n={n}", n, "remove", remove_layers=tuple(evenly_spaced(n, n_layers)))
                for n in ns]
    if preset == "tensor-sensitivity":
        layer = check_layers(_int_list(item.get("layer", n_layers // 2), f"{path}.layer"), f"{path}.layer")[0]
        out = [DesignPoint("tensor-sensitivity", f"{r}@all", None, "decompose", plan=_plan("all", [r], rank, method))
               for r in roles]
        out += [DesignPoint("tensor-sensitivity", f"{r}@L{layer}", None, "decompose",
                            plan=_plan([layer], [r], rank, method)) for r in roles]
        out += [DesignPoint("tensor-sensitivity", f"{g}@all", None, "decompose", plan=_plan("all", [g], rank, method))
                for g in ("attn", "mlp")]
        return out
    if preset == "rank-sweep":
        layers = check_layers(_int_list(item.get("layers", evenly_spaced(3, n_layers)), f"{path}.layers"),
                              f"{path}.layers")
        ranks = item.get("ranks", [1, 8, 32, 0.25, 0.5])
        return [DesignPoint("rank-sweep", f"r={_rank_label(r)}", r, "decompose", plan=_plan(layers, tensors, r, method))
                for r in ranks]
    if preset == "layer-density":
        count = _pos_int(item.get("count", 5), f"{path}.count") or 5
        spacings = _int_list(item.get("spacings", [6, 5, 4, 3, 2, 1]), f"{path}.spacings", minimum=1)
        out = []
        for s in spacings:
            if (count - 1) * s + 1 > n_layers:
                raise _err(f"{path}.spacings", f"{count} layers at spacing {s} need {(count - 1) * s + 1} layers, "
                                               f"the model has {n_layers}")
            out.append(DesignPoint("layer-density", f"s={s}", s, "decompose",
                                   plan=_plan(dense_layers_at_spacing(count, s, n_layers), tensors, rank, method)))
        return out
    if preset == "single-layer":
        layers = check_layers(_int_list(item.get("layers", list(range(n_layers))), f"{path}.layers"),
                              f"{path}.layers")
        return [DesignPoint("single-layer", f"L{ly}", ly, "decompose", plan=_plan([ly], tensors, rank, method))
                for ly in layers]
    raise SpecError(f"spec.{path}.preset: unknown preset {preset!r}")  # pragma: no cover (checked at load)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def expand_grid(grid: Sequence[Mapping[str, Any]], n_layers: int, roles: Sequence[str]) -> list[DesignPoint]:
    """Every point of a grid spec, in order; a point listed twice (same kind and plan) is kept once."""
    out: list[DesignPoint] = []
    seen: set[str] = set()
    for i, item in enumerate(grid):
        for point in expand_item(item, n_layers, roles, f"grid[{i}]"):
            key = repr((point.sweep, point.kind, point.plan, point.remove_layers))
            if key not in seen:
                seen.add(key)
                out.append(point)
    return out


def validate_points(points: Sequence[DesignPoint], model: Any) -> None:
    """Every decompose point's plan resolves against the model (layers, roles, ranks, methods): a one-line
    error naming the point otherwise. Nothing in the model changes."""
    from rankwise.decomposition import available_methods
    from rankwise.design.plan import Plan
    from rankwise.models.adapters import adapter_for

    adapter = adapter_for(model)
    targets = adapter.targets()
    for point in points:
        if point.kind != "decompose":
            continue
        try:
            Plan.from_dict(point.plan or {}).resolve(targets, adapter.roles, adapter.role_groups(),
                                                     known_methods=available_methods())
        except RankwiseError as exc:
            raise RankwiseError(f"point {point.sweep} {point.label}: {exc}") from None

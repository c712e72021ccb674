"""Selectors a person can type in a plan: which layers, which tensors.

Layers: an int, a list (``[2, 17, 31]``), a range string (``"20-29"``), a comma string (``"2,17,29"``,
``"0-3,10"``) or ``"all"``. Tensors: role names, group names (``attn``, ``mlp``) or ``all``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rankwise.errors import PlanError

LayerSelector = int | str | list[int | str]
TensorSelector = str | list[str]


def _parse_layer_token(token: str, n_layers: int | None, field: str) -> list[int]:
    token = token.strip()
    if not token:
        raise PlanError(f"{field}: empty layer entry")
    if token == "all":
        if n_layers is None:
            return []
        return list(range(n_layers))
    if "-" in token.lstrip("-"):
        lo_text, hi_text = token.split("-", 1)
        try:
            lo, hi = int(lo_text), int(hi_text)
        except ValueError:
            raise PlanError(f"{field}: '{token}' is not a layer range like '20-29'") from None
        if lo > hi:
            raise PlanError(f"{field}: layer range '{token}' is empty (start > end)")
        return list(range(lo, hi + 1))
    try:
        return [int(token)]
    except ValueError:
        raise PlanError(f"{field}: '{token}' is not a layer index, range or 'all'") from None


def parse_layers(selector: LayerSelector, n_layers: int | None = None, field: str = "layers") -> list[int]:
    """Expand a layer selector to sorted unique indices; checks them against ``n_layers`` when given."""
    if isinstance(selector, bool):
        raise PlanError(f"{field}: {selector!r} is not a layer selector")
    if isinstance(selector, int):
        items: Sequence[int | str] = [selector]
    elif isinstance(selector, str):
        items = selector.split(",")
    elif isinstance(selector, Sequence):
        items = list(selector)
        if not items:
            raise PlanError(f"{field}: empty list of layers")
    else:
        raise PlanError(f"{field}: {selector!r} is not a layer selector (int, list, 'a-b' or 'all')")
    layers: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise PlanError(f"{field}: {item!r} is not a layer index")
        if isinstance(item, int):
            layers.add(item)
        elif isinstance(item, str):
            layers.update(_parse_layer_token(item, n_layers, field))
        else:
            raise PlanError(f"{field}: {item!r} is not a layer index")
    if n_layers is not None:
        bad = sorted(i for i in layers if i < 0 or i >= n_layers)
        if bad:
            raise PlanError(f"{field}: layer {bad[0]} is out of range 0..{n_layers - 1}")
    return sorted(layers)


def parse_tensors(selector: TensorSelector, roles: Sequence[str] | None = None,
                  groups: Mapping[str, Sequence[str]] | None = None, field: str = "tensors") -> list[str]:
    """Expand a tensor selector to role names in the model's order; unknown names raise :class:`PlanError`."""
    if isinstance(selector, str):
        items = [s.strip() for s in selector.split(",") if s.strip()]
    elif isinstance(selector, Sequence) and all(isinstance(s, str) for s in selector):
        items = list(selector)
    else:
        raise PlanError(f"{field}: {selector!r} is not a list of tensor roles")
    if not items:
        raise PlanError(f"{field}: no tensors selected")
    if roles is None:
        return items
    groups = groups or {"all": tuple(roles)}
    chosen: set[str] = set()
    for item in items:
        if item in groups:
            chosen.update(groups[item])
        elif item in roles:
            chosen.add(item)
        else:
            known = ", ".join([*roles, *groups])
            raise PlanError(f"{field}: unknown tensor role '{item}' (this model has: {known})")
    return [r for r in roles if r in chosen]

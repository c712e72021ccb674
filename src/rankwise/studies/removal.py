"""Dropping whole blocks (layer removal), reversibly: the baseline the paper's rank-1 decomposition is
closest to (a rank-1 block barely touches the residual stream).

The blocks are taken out of the model's block list rather than replaced by an identity: a decoder's KV
cache is indexed by each attention module's ``layer_idx`` and sized by ``config.num_hidden_layers``, so an
identity stand-in would leave holes in the cache (and a hole at layer 0 breaks the position bookkeeping of
cached decoding, which the evaluation engine uses for shared prompt heads). Removing the blocks, renumbering
the kept ones' ``layer_idx`` and shrinking the config gives a model that behaves exactly like a model
built with fewer layers; :func:`restore_blocks` puts everything back bit for bit.

Kept local to studies on purpose: a plan-level ``remove`` belongs to the design package and will replace
this once it exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rankwise.errors import PlanError
from rankwise.models.adapters import adapter_for


@dataclass
class Removal:
    """What :func:`remove_blocks` changed, to undo it."""

    parent: nn.Module
    attr: str
    original: nn.ModuleList
    config: Any
    config_values: dict[str, Any]
    layer_idx: list[tuple[nn.Module, int]] = field(default_factory=list)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def remove_blocks(model: nn.Module, layers: Sequence[int]) -> Removal:
    """Drop the blocks at ``layers`` from ``model`` in place; returns what :func:`restore_blocks` needs."""
    adapter = adapter_for(model)
    n = adapter.n_layers
    drop = sorted(set(layers))
    bad = [x for x in drop if not 0 <= x < n]
    if bad:
        raise PlanError(f"remove_layers: layer {bad[0]} is out of range 0..{n - 1}")
    if len(drop) >= n:
        raise PlanError(f"remove_layers: removing all {n} blocks leaves no model")
    parent, attr = _parent(model, adapter.blocks_path)
    original = getattr(parent, attr)
    kept = [block for i, block in enumerate(original) if i not in set(drop)]
    config = getattr(model, "config", None)
    saved: dict[str, Any] = {}
    removal = Removal(parent=parent, attr=attr, original=original, config=config, config_values=saved)
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and not isinstance(idx, bool):
                removal.layer_idx.append((module, idx))
                module.layer_idx = new_idx
    if config is not None:
        for key in ("num_hidden_layers", "layer_types"):
            if hasattr(config, key):
                saved[key] = getattr(config, key)
        if "num_hidden_layers" in saved:
            config.num_hidden_layers = len(kept)
        if isinstance(saved.get("layer_types"), list):
            config.layer_types = [t for i, t in enumerate(saved["layer_types"]) if i not in set(drop)]
    setattr(parent, attr, nn.ModuleList(kept))
    return removal


def restore_blocks(removal: Removal) -> None:
    """Undo :func:`remove_blocks`: the original block list, layer indices and config values."""
    setattr(removal.parent, removal.attr, removal.original)
    for module, idx in removal.layer_idx:
        module.layer_idx = idx
    for key, value in removal.config_values.items():
        setattr(removal.config, key, value)

"""Layer removal: drop whole blocks, the baseline the paper's rank-1 decomposition is closest to.

A plan's ``remove_layers: [..]`` takes those blocks out of the model's block list. They are *removed*, not
replaced by an identity stand-in: a decoder's KV cache is indexed by each attention module's ``layer_idx``
and sized by ``config.num_hidden_layers``, so an identity stand-in would leave holes in the cache (a hole at
layer 0 breaks cached decoding's position bookkeeping, which the evaluation engine uses for shared prompt
heads). Removing the blocks, renumbering the kept ones' ``layer_idx`` and shrinking the config gives exactly
a model built with fewer layers: its parameters count correctly from ``model.parameters()``, and
``save_pretrained`` writes an ordinary checkpoint with ``num_hidden_layers = L - k`` that loads back as
such. Layer numbers in the plan always refer to the *original* model; removal is applied after the plan's
decompositions, so the checkpoint's module names are the renumbered ones.
:func:`restore_blocks` undoes a removal bit for bit (used by sweeps that reuse one loaded model).
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

    layers: tuple[int, ...]
    parent: nn.Module
    attr: str
    original: nn.ModuleList
    config: Any
    config_values: dict[str, Any]
    layer_idx: list[tuple[nn.Module, int]] = field(default_factory=list)


def remove_blocks(model: nn.Module, layers: Sequence[int]) -> Removal:
    """Drop the blocks at ``layers`` from ``model`` in place; returns what :func:`restore_blocks` needs."""
    adapter = adapter_for(model)
    if len(getattr(adapter, "stacks", ((None, 0),))) != 1:
        raise PlanError("remove_layers: supported for models with one stack of blocks (decoder- or encoder-only)")
    n = adapter.n_layers
    drop = sorted(set(layers))
    bad = [x for x in drop if not 0 <= x < n]
    if bad:
        raise PlanError(f"remove_layers: layer {bad[0]} is out of range 0..{n - 1}")
    if len(drop) >= n:
        raise PlanError(f"remove_layers: removing all {n} blocks leaves no model")
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    dropped = set(drop)
    kept = [block for i, block in enumerate(original) if i not in dropped]
    config = getattr(model, "config", None)
    saved: dict[str, Any] = {}
    removal = Removal(tuple(drop), parent, attr, original, config, saved)
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
            config.layer_types = [t for i, t in enumerate(saved["layer_types"]) if i not in dropped]
    setattr(parent, attr, nn.ModuleList(kept))
    return removal


def restore_blocks(removal: Removal) -> None:
    """Undo :func:`remove_blocks`: the original block list, layer indices and config values."""
    setattr(removal.parent, removal.attr, removal.original)
    for module, idx in removal.layer_idx:
        module.layer_idx = idx
    for key, value in removal.config_values.items():
        setattr(removal.config, key, value)

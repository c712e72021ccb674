"""The on-disk format of a rankwise checkpoint, shared by the saver and the two transformers loaders.

A checkpoint is an ordinary Hugging Face model folder. What marks it as decomposed is one block in
``config.json``::

    "quantization_config": {
        "quant_method": "rankwise", "version": 1,
        "modules": {"model.layers.2.self_attn.q_proj": {"in_features": 576, "out_features": 576,
                    "rank_out": 1, "rank_in": 1, "form": "three_factor", "bias": false}, ...},
        "plan": {...the plan that produced it, each method as {name, every setting}...}
    }

Loaders rebuild the architecture, swap an empty factorized layer in at each listed name, and load the
factor tensors (``<name>.first.weight``, ``.core.weight``, ``.last.weight``, ``.last.bias``) from
``model.safetensors``. This module imports nothing heavy: it is used before transformers is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from rankwise.layers.factorized import FactorizedLinear, FactorizedShape
from rankwise.layers.modules import QUANT_METHOD, is_factorized
from rankwise.layers.transposed import STORED_TRANSPOSED
from rankwise.models.layouts import is_transposed, projection_shape

FORMAT_VERSION = 1
MODELING_FILE = "modeling_rankwise.py"
REPORT_FILE = "decomposition_report.json"
_SHAPE_KEYS = ("in_features", "out_features", "rank_out", "rank_in", "form", "bias")


def shape_dict(module: nn.Module) -> dict[str, Any]:
    """The recorded shape of a factorized layer (either implementation)."""
    shape = module.shape
    data = shape.to_dict() if isinstance(shape, FactorizedShape) else dict(shape)
    return {k: data[k] for k in _SHAPE_KEYS}


def factorized_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every factorized layer of a model by dotted name, with its shape."""
    return {name: shape_dict(m) for name, m in model.named_modules() if name and is_factorized(m)}


def inject_factorized(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Replace the Linear at each recorded name by an empty FactorizedLinear of the recorded shape.

    Runs on transformers' meta-device skeleton (no memory is allocated); layers already factorized (by a
    remote-code model class) are left alone.
    """
    for name, data in modules.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"rankwise checkpoint: the model has no module {name}") from None
        if is_factorized(old):
            continue
        shape = FactorizedShape(**{k: data[k] for k in _SHAPE_KEYS})
        out_features, in_features = projection_shape(old)  # a Conv1D (GPT-2) stores (in, out)
        if (in_features, out_features) != (shape.in_features, shape.out_features):
            raise ValueError(f"rankwise checkpoint: {name} is {out_features}x{in_features} in the model "
                             f"but {shape.out_features}x{shape.in_features} in the checkpoint")
        new = FactorizedLinear(shape, dtype=old.weight.dtype, device=old.weight.device)
        if is_transposed(old):
            setattr(new, STORED_TRANSPOSED, True)  # merges back into the Conv1D the architecture has here
        setattr(parent, attr, new)


def realign_factors(model: nn.Module) -> None:
    """Move factor tensors out of the (unaligned) memory-mapped checkpoint into fresh allocations.

    Why: BLAS kernels for skinny matrices (rank 1 to a few) sum in an order that depends on the data's
    address alignment; safetensors' memory map places tensors at arbitrary 8-byte offsets, torch's
    allocator at 64-byte ones. Copying the (small) factors makes a reloaded model compute bit-for-bit
    what the in-memory decomposed model computes.
    """
    for module in model.modules():
        if is_factorized(module):
            for param in module.parameters(recurse=True):
                if param.device.type == "cpu" and param.data_ptr() % 64:
                    param.data = param.data.clone()


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's config.json as a dict, or None when there is none (or it is unreadable)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_checkpoint(folder: str | Path) -> bool:
    """Whether a folder holds a rankwise checkpoint."""
    config = read_config(folder) if Path(folder).is_dir() else None
    return bool(config) and (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD

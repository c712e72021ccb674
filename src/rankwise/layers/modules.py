"""Recognising, replacing and merging factorized layers inside a model: the one place that walks a model's
modules for them (decomposition, execution and checkpoints all use it, as PEFT's tuners share one injector).
"""

from __future__ import annotations

from torch import nn

from rankwise.layers.factorized import FactorizedLinear
from rankwise.layers.transposed import dense_like


def is_factorized(module: nn.Module) -> bool:
    """A factorized layer: rankwise's own, or the self-contained copy remote-code checkpoints define."""
    return isinstance(module, FactorizedLinear) or (
        type(module).__name__ == "FactorizedLinear" and hasattr(module, "first") and hasattr(module, "last"))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` is, through its parent (the model itself for a top-level name)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def merge_factorized_(model: nn.Module) -> nn.Module:
    """Replace every factorized layer by the plain ``nn.Linear`` it equals (weight A·G·Bᵀ), in place (by the
    ``Conv1D`` it equals where the architecture has one, so the merged model saves as that architecture)."""
    for name, module in list(model.named_modules()):
        if name and is_factorized(module):
            replace_module(model, name, dense_like(module, module.merge()))
    return model

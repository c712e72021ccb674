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


#: Attribute on a decomposed model holding the last decomposition's report (read by savers and tools).
REPORT_ATTR = "_rankwise_report"
#: The ``quant_method`` under which rankwise checkpoints register with transformers.
QUANT_METHOD = "rankwise"


def merge_(model: nn.Module) -> nn.Module:
    """Turn every factorized layer back into a plain ``nn.Linear`` (weight A·G·Bᵀ); returns the model.

    The result has the dense model's structure (and size) with the decomposition's approximation baked in,
    and no longer claims to be a rankwise checkpoint (its quantization config and report are dropped): useful
    to export to tools that do not know factorized layers.
    """
    merge_factorized_(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == QUANT_METHOD:
        quantizer.remove_quantization_config(model)
    if hasattr(getattr(model, "config", None), "quantization_config"):
        qc = model.config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method == QUANT_METHOD:
            del model.config.quantization_config
    if hasattr(model, REPORT_ATTR):
        delattr(model, REPORT_ATTR)
    return model

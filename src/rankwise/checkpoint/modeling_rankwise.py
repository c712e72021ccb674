"""Loader for a rankwise low-rank checkpoint that needs only torch and transformers (``trust_remote_code``).

rankwise replaced some ``nn.Linear`` layers of this model by factorized layers W ≈ A·G·Bᵀ, run as two or
three chained bias-free Linears (``first``: in → r2, optional ``core``: r2 → r1, ``last``: r1 → out, with
the original bias). ``config.json`` lists them under ``quantization_config.modules`` with their shapes.

This file lets ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` rebuild that structure in a
process without rankwise: the model class at the bottom (written by ``rankwise.save`` for the base
architecture) injects empty factorized layers at the recorded names right after the base ``__init__``,
and transformers then loads the factor tensors from ``model.safetensors`` as usual. It also registers the
``rankwise`` quantization method with transformers when rankwise itself is not installed, so the config
is understood (no "unknown quantization type" warning; tools that rebuild the config keep working).
With rankwise installed, ``import rankwise`` and plain ``from_pretrained(folder)`` do the same without
remote code.

This file imports only torch and transformers, by design.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANT_METHOD = "rankwise"


class FactorizedLinear(nn.Module):
    """y = x·B·Gᵀ·Aᵀ + b as chained Linears: ``first`` (in→r2), optional ``core`` (r2→r1), ``last`` (r1→out)."""

    def __init__(self, in_features: int, out_features: int, rank_out: int, rank_in: int, form: str, bias: bool,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        self.shape = {"in_features": in_features, "out_features": out_features, "rank_out": rank_out,
                      "rank_in": rank_in, "form": form, "bias": bias}
        self.in_features = in_features
        self.out_features = out_features
        kw = {"dtype": dtype, "device": device}
        self.first = nn.Linear(in_features, rank_in, bias=False, **kw)
        if form == "three_factor":
            self.core = nn.Linear(rank_in, rank_out, bias=False, **kw)
            self.last = nn.Linear(rank_out, out_features, bias=bias, **kw)
        else:
            self.core = None
            self.last = nn.Linear(rank_in, out_features, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, self.first.weight)
        if self.core is not None:
            h = nn.functional.linear(h, self.core.weight)
        return nn.functional.linear(h, self.last.weight, self.last.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent, for model code that reads ``.weight`` (T5 checks its MLP's dtype this way)."""
        return self.dense_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            work = torch.promote_types(self.first.weight.dtype, torch.float32)
            left = self.last.weight.to(work)
            if self.core is not None:
                left = left @ self.core.weight.to(work)
            return (left @ self.first.weight.to(work)).to(self.first.weight.dtype)

    def merge(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.last.bias is not None,
                          dtype=self.first.weight.dtype, device=self.first.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.last.bias is not None:
                dense.bias.copy_(self.last.bias)
        return dense


def module_map(config: Any) -> dict[str, dict[str, Any]]:
    """The factorized modules recorded in the config (a dict, or a quantization-config object)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return {}
    modules = qc.get("modules") if isinstance(qc, dict) else getattr(qc, "modules", None)
    return dict(modules or {})


def inject_factorized(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Replace the Linear at each recorded name by an empty factorized layer (same dtype and device)."""
    for name, shape in modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if type(old).__name__ == "FactorizedLinear":
            continue
        # a transformers Conv1D (GPT-2) stores its weight as (in, out) and has no in_features/out_features
        n_in, n_out = tuple(old.weight.shape) if hasattr(old, "nf") else (old.in_features, old.out_features)
        if (n_in, n_out) != (shape["in_features"], shape["out_features"]):
            raise ValueError(f"rankwise checkpoint: {name} is {n_out}x{n_in} in the model "
                             f"but {shape['out_features']}x{shape['in_features']} in the checkpoint")
        setattr(parent, attr, FactorizedLinear(**shape, dtype=old.weight.dtype, device=old.weight.device))


def realign_factors(model: nn.Module) -> None:
    """Copy factor tensors out of the unaligned memory map: skinny-matrix BLAS kernels sum in an order that
    depends on address alignment, so this makes outputs bit-identical to the model that was saved."""
    for module in model.modules():
        if type(module).__name__ == "FactorizedLinear":
            for param in module.parameters():
                if param.device.type == "cpu" and param.data_ptr() % 64:
                    param.data = param.data.clone()


class RankwiseModelMixin:
    """Mixed in before a transformers model class: build the base model, then inject the factorized layers."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        inject_factorized(self, module_map(config))


def _register_with_transformers() -> None:
    """Teach transformers the ``rankwise`` quantization method, unless rankwise (or this file) already did."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return

    class RankwiseRemoteConfig(QuantizationConfigMixin):
        def __init__(self, modules: dict | None = None, plan: dict | None = None, version: int = 1,
                     **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.version = version
            self.modules = dict(modules or {})
            self.plan = plan
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)

    class RankwiseRemoteQuantizer(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            inject_factorized(model, dict(self.quantization_config.modules))
            return model

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            realign_factors(model)
            model.is_quantized = False  # factors are ordinary float tensors: casting and training work
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = RankwiseRemoteConfig
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = RankwiseRemoteQuantizer


_register_with_transformers()

# --- the model class for this checkpoint's architecture (appended by rankwise.save) --------------------------

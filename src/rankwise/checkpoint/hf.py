"""The ``rankwise`` quantization method for transformers: how plain ``from_pretrained`` loads a checkpoint.

transformers builds a model from ``config.json``, then lets the quantizer named by
``quantization_config.quant_method`` rewrite the (still empty, meta-device) model before it loads the
weights. rankwise registers such a quantizer: it swaps the Linear at each recorded module name for an
empty :class:`~rankwise.layers.FactorizedLinear` of the recorded shape, and transformers then fills the
factors from ``model.safetensors`` by their ordinary names (``…q_proj.first.weight``). Nothing is
quantized: the name is transformers' extension point for "the checkpoint's modules differ from the
architecture's". After loading, ``model.is_quantized`` is reset so ``.half()`` / ``.float()`` and training
work as on any model.

Importing this module imports transformers' quantizer registry (slow), so :mod:`rankwise.checkpoint`
registers lazily: when transformers imports that registry, not when rankwise is imported.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rankwise.checkpoint.format import FORMAT_VERSION, QUANT_METHOD, inject_factorized, realign_factors
from rankwise.layers.modules import merge_


class RankwiseQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a rankwise checkpoint: format version, factorized modules, the plan."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, plan: dict[str, Any] | None = None,
                 version: int = FORMAT_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.version = int(version)
        if self.version > FORMAT_VERSION:
            raise ValueError(f"rankwise checkpoint format version {self.version} is newer than this rankwise "
                             f"({FORMAT_VERSION}); upgrade rankwise")
        self.modules = dict(modules or {})
        self.plan = plan
        for key, value in kwargs.items():  # keep unknown keys so a re-save does not drop them
            if key != "quant_method":
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("quant_method", "version", "modules", "plan")}
        return {"quant_method": QUANT_METHOD, "version": self.version, "modules": dict(self.modules),
                "plan": self.plan, **out}


class RankwiseHfQuantizer(HfQuantizer):
    """Injects empty factorized layers before weight loading; the weights are loaded as they are."""

    requires_calibration = False
    quantization_config: RankwiseQuantizationConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        inject_factorized(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        realign_factors(model)
        model.is_quantized = False
        return model

    def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
        return merge_(model)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Make ``rankwise`` a known quantization method (replacing the stand-in a remote-code file registers)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is RankwiseHfQuantizer:
        return
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING and QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RankwiseQuantizationConfig)
        register_quantizer(QUANT_METHOD)(RankwiseHfQuantizer)
        return
    # the registration functions refuse a second registration; replace the remote-code stand-in directly
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = RankwiseQuantizationConfig
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = RankwiseHfQuantizer

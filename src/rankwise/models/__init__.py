"""Models: loading (the zoo) and architecture adapters."""

from rankwise.models.adapters import ArchitectureAdapter, TargetInfo, adapter_for, register_adapter
from rankwise.models.bundled import BUNDLED, DEFAULT_MODEL
from rankwise.models.zoo import LoadedModel, ModelInfo, load, parse_dtype

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "ArchitectureAdapter",
    "LoadedModel",
    "ModelInfo",
    "TargetInfo",
    "adapter_for",
    "load",
    "parse_dtype",
    "register_adapter",
]

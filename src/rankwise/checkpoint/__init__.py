"""Checkpoints: save a decomposed model as a Hugging Face folder; load it with rankwise or transformers.

Importing this package makes transformers understand rankwise checkpoints (``quant_method: rankwise``).
The registration itself imports transformers' quantizer registry, which costs seconds, so it is deferred:
if that registry is already imported it happens now, otherwise a one-shot import hook runs it right after
transformers imports the registry (which ``from_pretrained`` always does first). ``import rankwise`` stays
fast and plain ``AutoModelForCausalLM.from_pretrained(checkpoint)`` still works in the same process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Any

from rankwise.checkpoint.format import QUANT_METHOD, factorized_modules, is_checkpoint, is_factorized
from rankwise.checkpoint.io import CheckpointError, load, save

log = logging.getLogger(__name__)

_REGISTRY_MODULE = "transformers.quantizers.auto"


def register_with_transformers() -> None:
    """Register the ``rankwise`` quantization method with transformers now (imports transformers)."""
    from rankwise.checkpoint.hf import register

    register()


def _after_registry_import(module: ModuleType) -> None:
    try:
        register_with_transformers()
    except Exception as exc:  # never break transformers' own import
        log.warning("rankwise: could not register the checkpoint format with transformers (%s)", exc)


class _Loader(importlib.abc.Loader):
    """Wraps the registry module's loader to run the registration once the module has executed."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _after_registry_import(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: finds the registry module with the other finders and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def _install() -> None:
    if _REGISTRY_MODULE in sys.modules:
        register_with_transformers()
    elif not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())


_install()

__all__ = [
    "QUANT_METHOD",
    "CheckpointError",
    "factorized_modules",
    "is_checkpoint",
    "is_factorized",
    "load",
    "register_with_transformers",
    "save",
]

"""What a model's ``forward`` takes, found once and used everywhere that passes a KV cache.

transformers renamed the KV-cache argument: up to 5.23 a causal LM's ``forward`` takes ``past_key_values``
and its output carries ``.past_key_values``; from 5.24 both are called ``cache``. Code that tests for one
spelling silently loses the cache with the other (a decode benchmark refuses the model, the scoring engine
falls back to a slower strategy). Every caller therefore asks this module: :func:`forward_caps` reads the
signature once per model class, :func:`cache_kwargs` spells the argument as this model wants it, and
:func:`output_cache` reads the cache back from an output of either vintage.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import nn

#: The KV-cache argument's names, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


@dataclass(frozen=True)
class ForwardCaps:
    """The optional arguments a model's ``forward`` accepts that rankwise uses."""

    cache_arg: str | None  # "cache" or "past_key_values"; None: no KV cache
    use_cache: bool
    logits_to_keep: bool
    position_ids: bool
    labels: bool

    @property
    def kv_cache(self) -> bool:
        """A cache can be passed in and asked for back."""
        return self.cache_arg is not None and self.use_cache


@lru_cache(maxsize=256)
def _caps_of(forward: Any) -> ForwardCaps:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        params = {}
    cache_arg = next((name for name in CACHE_ARGUMENTS if name in params), None)
    return ForwardCaps(cache_arg=cache_arg, use_cache="use_cache" in params,
                       logits_to_keep="logits_to_keep" in params, position_ids="position_ids" in params,
                       labels="labels" in params)


def forward_caps(model: nn.Module) -> ForwardCaps:
    """The capabilities of ``model.forward`` (cached per function: cheap to call per batch)."""
    forward = getattr(type(model), "forward", None) or model.forward
    return _caps_of(forward)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass ``cache`` in (``None`` starts a new one) and ask for it back.

    Raises ``TypeError`` for a model without a KV cache: callers check :attr:`ForwardCaps.kv_cache` first and
    say in their output what they do instead.
    """
    caps = forward_caps(model)
    if not caps.kv_cache:
        raise TypeError(f"{type(model).__name__}.forward takes no KV cache")
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs[caps.cache_arg] = cache  # type: ignore[index]
    return kwargs


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``.cache`` from transformers 5.24, ``.past_key_values`` before).

    An output class that declares a cache field is read by that field only: on 5.24 reading the old name
    (when ``cache`` is None) goes through a deprecation shim that prints a warning to the user.
    """
    declared = getattr(output, "__dataclass_fields__", None) or {}
    field = next((name for name in CACHE_ARGUMENTS if name in declared), None)
    if field is not None:
        return getattr(output, field)
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """A model with an LM head whose forward takes a KV cache: decode workloads and generation apply.

    The one "is a causal LM" check in rankwise (by capability, not by class name, so wrappers and new
    families qualify as soon as they take a cache).
    """
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return head is not None and forward_caps(model).kv_cache

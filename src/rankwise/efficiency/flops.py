"""Analytic FLOPs of a forward pass: prefill of S tokens and one decode step, dense or factorized.

What is counted (and what ``torch.utils.flop_counter.FlopCounterMode`` counts on the same pass):

* every ``nn.Linear`` leaf: 2·in·out FLOPs per token it is applied to. A :class:`FactorizedLinear` is made
  of ``nn.Linear`` children, so it counts as 2·(r2·n + r1·r2 + m·r1) (three-factor) or 2·(r·n + m·r)
  (two-factor) by construction: the walk sees the real factor shapes;
* attention score and value matmuls: 2·2·(keys)·(heads·head_dim) per query token per layer, with the
  *query* head count (grouped-query attention broadcasts the K/V heads, so the arithmetic is per query head).
  A prefill of S tokens counts the full S×S score matrix, as SDPA kernels compute it and as
  FlopCounterMode counts it (a causal-aware kernel skips about half);
* the LM head (a Linear) on every position (scoring) or the last one (``logits="last"``, as generation's
  prefill does).

Excluded (cheap next to the matmuls, and not counted by FlopCounterMode either): normalisation,
activations and gating products, softmax, rotary embeddings, residual adds, bias adds, embedding lookup.
Linears outside the blocks other than the LM head (a BERT pooler) are applied once per sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionShape:
    """What the attention arithmetic depends on, read from the model's config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def attention_shape(model: nn.Module) -> AttentionShape:
    """Heads, KV heads and head size from ``model.config`` (Llama-style and BERT-style names)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no config: cannot count attention FLOPs")
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    layers = int(cfg.num_hidden_layers)
    return AttentionShape(n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=head_dim)


@dataclass(frozen=True)
class LinearInventory:
    """Multiply-accumulates per token of the model's Linears, split by how often they run."""

    per_token_macs: int  # block linears (and other per-token linears): in·out summed
    lm_head_macs: int  # the output projection: in·out
    per_sequence_macs: int  # poolers: applied to one position per sequence


def linear_inventory(model: nn.Module) -> LinearInventory:
    """Sum in·out over the model's ``nn.Linear`` leaves (FactorizedLinear children included)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    per_token = lm_head = per_seq = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        macs = int(module.in_features) * int(module.out_features)
        if module is head:
            lm_head += macs
        elif "pooler" in name.split("."):
            per_seq += macs
        else:
            per_token += macs
    return LinearInventory(per_token_macs=per_token, lm_head_macs=lm_head, per_sequence_macs=per_seq)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one pass, by part; ``tokens`` is how many new tokens the pass processes."""

    linear: int
    attention: int
    lm_head: int
    tokens: int

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head

    @property
    def per_token(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "per_token": self.per_token}


def prefill_flops(model: nn.Module, seq_len: int, batch: int = 1, logits: str = "all") -> FlopCount:
    """FLOPs of a forward pass over ``batch`` sequences of ``seq_len`` tokens with an empty cache.

    ``logits="all"`` applies the LM head at every position (scoring, perplexity); ``"last"`` at the final
    position only (generation's prefill).
    """
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', not {logits!r}")
    inv = linear_inventory(model)
    att = attention_shape(model)
    tokens = batch * seq_len
    linear = 2 * inv.per_token_macs * tokens + 2 * inv.per_sequence_macs * batch
    attention = att.n_layers * batch * 2 * 2 * seq_len * seq_len * att.q_width
    head_positions = tokens if logits == "all" else batch
    return FlopCount(linear=linear, attention=attention, lm_head=2 * inv.lm_head_macs * head_positions,
                     tokens=tokens)


def decode_flops(model: nn.Module, context_len: int, batch: int = 1) -> FlopCount:
    """FLOPs of one decode step: each of ``batch`` sequences adds one token to ``context_len`` cached ones.

    The new token's query attends to ``context_len + 1`` keys (the cache plus itself).
    """
    inv = linear_inventory(model)
    att = attention_shape(model)
    keys = context_len + 1
    return FlopCount(linear=2 * inv.per_token_macs * batch,
                     attention=att.n_layers * batch * 2 * 2 * keys * att.q_width,
                     lm_head=2 * inv.lm_head_macs * batch, tokens=batch)


def linear_flops(module: nn.Module, tokens: int = 1) -> int:
    """FLOPs of one (possibly factorized) linear layer applied to ``tokens`` tokens: 2·Σ in·out of its leaves."""
    leaves = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return 2 * tokens * sum(int(m.in_features) * int(m.out_features) for m in leaves)


# --- cross-check with torch's counter ------------------------------------------------------------------------
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch registers SDPA formulas for the CUDA kernels only; the CPU flash kernel does the same matmuls."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counter_mapping() -> dict[Any, Any]:
    """Extra FlopCounterMode formulas so SDPA on CPU is counted like on CUDA."""
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flop
    return mapping


def counted_flops(model: nn.Module, input_ids: torch.Tensor, **forward_kwargs: Any) -> dict[str, int]:
    """FLOPs of ``model(input_ids, **forward_kwargs)`` as ``FlopCounterMode`` counts them, by aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=counter_mapping()) as counter:
        model(input_ids, **forward_kwargs)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), **by_op}


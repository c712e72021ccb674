"""Module layouts: the one table that names transformer projections, and how a block is read with it.

rankwise never asks *which model family* a model is. It asks what a block contains: each projection inside
a block (an ``nn.Linear``, GPT-2's transposed ``Conv1D``, or an already factorized layer) has a dotted path
relative to the block, and :data:`MODULE_PATTERNS` maps that path to a canonical *role*. The table covers
the module-name conventions transformers uses (q/k/v/o + gate/up/down; fused ``qkv``/``gate_up``;
``c_attn``/``c_proj``/``c_fc``; ``query_key_value``/``dense_h_to_4h``/``dense_4h_to_h``; BERT's
``query``/``attention.output.dense``/``intermediate.dense``/``output.dense``; T5's ``SelfAttention``/
``EncDecAttention``/``DenseReluDense``), so a family transformers adds tomorrow with one of these layouts gets
canonical roles with no code here. Anything the table does not match keeps its own path as its role.

Roles (:data:`ROLE_ORDER`):

* ``q, k, v, o`` - self-attention query, key, value, output; ``qkv`` - a fused query-key-value projection
  (decomposed as one matrix);
* ``cross_q, cross_k, cross_v, cross_o`` - cross-attention in the decoder blocks of encoder-decoder models;
* ``gate, up, down`` - the MLP (``up`` is the first projection of a non-gated MLP: ``fc1``, ``c_fc``,
  ``intermediate.dense``, T5's ``wi``); ``gate_up`` - a fused gate+up projection (one matrix).

This module is the only place in ``src/rankwise`` that spells module names of particular architectures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

_ANY = r"(?:.*\.)?"  # any parent path inside the block (or none)
_SELF_ATTN = r"(?:self_attn|self_attention|attn|attention|SelfAttention)"
_CROSS_ATTN = r"(?:encoder_attn|EncDecAttention|cross_attn|crossattention(?:\.self)?)"

#: THE table: (role, regular expression fully matching a projection's dotted path inside one block).
#: The first matching row wins, so cross-attention precedes self-attention and ``o`` precedes ``down``
#: (BERT's ``attention.output.dense`` vs ``output.dense``; GPT-2's ``attn.c_proj`` vs ``mlp.c_proj``).
MODULE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("cross_q", _ANY + _CROSS_ATTN + r"\.(?:q|q_proj|query)"),
    ("cross_k", _ANY + _CROSS_ATTN + r"\.(?:k|k_proj|key)"),
    ("cross_v", _ANY + _CROSS_ATTN + r"\.(?:v|v_proj|value)"),
    ("cross_o", _ANY + r"(?:(?:encoder_attn|EncDecAttention|cross_attn)\.(?:o|o_proj|out_proj)"
                r"|crossattention\.output\.dense)"),
    ("qkv", _ANY + r"(?:qkv|qkv_proj|query_key_value|c_attn|Wqkv|in_proj)"),
    ("q", _ANY + r"(?:q_proj|query|query_proj|q_lin|q)"),
    ("k", _ANY + r"(?:k_proj|key|key_proj|k_lin|k)"),
    ("v", _ANY + r"(?:v_proj|value|value_proj|v_lin|v)"),
    ("o", _ANY + r"(?:o_proj|out_proj|out_lin|attention\.output\.dense|" + _SELF_ATTN + r"\.(?:o|dense|c_proj|Wo))"),
    ("gate_up", _ANY + r"(?:gate_up_proj|mlp\.Wi)"),
    ("gate", _ANY + r"(?:gate_proj|wi_0)"),
    ("up", _ANY + r"(?:up_proj|wi_1|wi|fc1|fc_in|c_fc|dense_h_to_4h|intermediate\.dense|lin1)"),
    ("down", _ANY + r"(?:down_proj|wo|fc2|fc_out|dense_4h_to_h|lin2|(?:mlp|ffn)\.(?:c_proj|Wo)|output\.dense)"),
)
_COMPILED = tuple((role, re.compile(pattern)) for role, pattern in MODULE_PATTERNS)

#: Canonical roles in the paper's order (attention, then MLP); roles a model lacks are simply absent.
ROLE_ORDER: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "cross_q", "cross_k", "cross_v", "cross_o",
                               "gate", "up", "gate_up", "down")
#: Roles that belong to attention (the ``attn`` group of a plan); the rest of the table's roles are MLP.
ATTENTION_ROLES = frozenset({"q", "k", "v", "qkv", "o", "cross_q", "cross_k", "cross_v", "cross_o"})
#: Fused roles and the roles they stand for, in the order their output rows are stacked.
FUSED_ROLES: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def role_of(path: str) -> str | None:
    """The canonical role of a projection at ``path`` inside a block, or None if the table has no row for it."""
    for role, pattern in _COMPILED:
        if pattern.fullmatch(path):
            return role
    return None


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight as (in, out): transformers' ``Conv1D`` (GPT-2 and relatives).

    Recognised by what it is (a ``Conv1D`` with ``nf`` output features and a 2-d weight), so importing
    transformers is not needed to ask.
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.dim() == 2)


def is_factorized_like(module: nn.Module) -> bool:
    """A factorized layer (rankwise's or the remote-code copy): chained ``first``/``last`` Linears."""
    return type(module).__name__ == "FactorizedLinear" and hasattr(module, "first") and hasattr(module, "last")


def is_projection(module: nn.Module) -> bool:
    """A decomposable projection: ``nn.Linear`` (and subclasses), ``Conv1D``, or an already factorized layer."""
    return isinstance(module, nn.Linear) or is_transposed(module) or is_factorized_like(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The projection's weight as an (out_features, in_features) matrix, as ``nn.Linear`` stores it.

    For a ``Conv1D`` this is a transposed view of the stored (in, out) parameter; callers that need a fresh
    contiguous copy should ``.clone(memory_format=torch.contiguous_format)`` it.
    """
    return module.weight.T if is_transposed(module) else module.weight


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a projection of any kind."""
    if is_transposed(module):
        n_in, n_out = module.weight.shape
        return int(n_out), int(n_in)
    return int(module.out_features), int(module.in_features)


def projections(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every projection inside ``block`` with its dotted path, in registration order, never descending into a
    projection (a factorized layer's ``first``/``last`` are its parts, not projections of the block)."""
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if is_projection(child):
                yield path, child
            else:
                yield from walk(child, path + ".")

    yield from walk(block, "")


def block_roles(block: nn.Module) -> dict[str, str] | None:
    """role -> path of each projection in a block of a standard layout, or None when the layout is unknown.

    A block counts as a standard layout when the table names at least two of its projections and no role
    twice (two matches for one role mean the table misreads the block: better the generic names than wrong
    roles). Projections the table does not name are kept under their own path as their role.
    """
    roles: dict[str, str] = {}
    extra: dict[str, str] = {}
    for path, _ in projections(block):
        role = role_of(path)
        if role is None:
            extra[path] = path
        elif role in roles:
            return None
        else:
            roles[role] = path
    if len(roles) < 2:
        return None
    ordered = {r: roles[r] for r in ROLE_ORDER if r in roles}
    return ordered | extra

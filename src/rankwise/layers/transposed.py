"""Dense layers stored transposed (transformers' ``Conv1D``, GPT-2 and relatives) and the factorized layers
that replace them.

A ``Conv1D`` computes ``x @ W + b`` with W stored (in, out). rankwise decomposes its (out, in) matrix like any
other and puts an ordinary factorized layer in its place, marked with :data:`STORED_TRANSPOSED`; merging such
a layer gives a ``Conv1D`` back (:func:`dense_like`), so a merged model keeps its architecture's weight layout
and saves and reloads as that architecture.
"""

from __future__ import annotations

import torch
from torch import nn

#: Attribute set on a factorized layer that stands where a ``Conv1D`` was: merging it gives a ``Conv1D`` back,
#: so the merged model keeps its architecture's (in, out) weight layout and saves as that architecture.
STORED_TRANSPOSED = "stored_transposed"


def as_transposed(linear: nn.Linear) -> nn.Module:
    """A transformers ``Conv1D`` computing exactly what ``linear`` computes (weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(linear.out_features, linear.in_features)
    with torch.no_grad():
        conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            conv.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            conv.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                 device=linear.weight.device))
    return conv


def dense_like(factorized: nn.Module, merged: nn.Linear) -> nn.Module:
    """The dense module to put back for a merged factorized layer: a ``Conv1D`` where one stood, else ``merged``."""
    return as_transposed(merged) if getattr(factorized, STORED_TRANSPOSED, False) else merged

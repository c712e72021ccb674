"""Sentence embeddings from an encoder by attention-mask-weighted mean pooling (sentence-transformers' recipe).

Models such as all-MiniLM-L6-v2 are trained so that the mean of the last hidden states over the real
(non-padding) tokens is the sentence embedding; the CLS vector or an unmasked mean gives much worse
similarities, so pooling must weight by the attention mask. Normalisation is left to the caller (cosine
similarity does not need it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rankwise.evaluation.engine import index_batches, inference

Progress = Callable[[int], None]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch x tokens x dim) over positions where ``attention_mask`` is 1."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def encoder_max_length(model: Any, tokenizer: Any) -> int:
    """The longest input the encoder takes: its position table, capped by the tokenizer's own limit."""
    limit = int(getattr(getattr(model, "config", None), "max_position_embeddings", 512) or 512)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return limit


def _last_hidden(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    return hidden


def encode_sentences(
    model: Any,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Mean-pooled embeddings (float32, CPU), one row per sentence in the order given.

    Sentences are batched by length (longest first) so little compute goes to padding; inputs longer than
    ``max_length`` tokens (default: the model's limit) are truncated.
    """
    max_length = max_length or encoder_max_length(model, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out: torch.Tensor | None = None
    with inference(model):
        for batch in index_batches(order, batch_size):
            enc = tokenizer([sentences[i] for i in batch], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            pooled = mean_pool(_last_hidden(model(**enc)), enc["attention_mask"]).float().cpu()
            if out is None:
                out = torch.empty((len(sentences), pooled.shape[1]), dtype=torch.float32)
            out[torch.tensor(list(batch))] = pooled
            if progress is not None:
                progress(len(batch))
    if out is None:
        raise ValueError("no sentences to encode")
    return out

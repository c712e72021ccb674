"""Greedy generation with stop sequences, batched, with a key/value cache and per-sequence early stopping.

lm-eval's ``generate_until`` calls ``model.generate`` on a left-padded batch and lets every sequence run
until *all* of them have hit a stop sequence, then cuts each text at its first stop sequence. The text a
sequence ends with depends only on its own greedy tokens, so rankwise produces the same strings with a
loop that drops a sequence from the batch (and from the cache) as soon as it is done: a GSM8K batch no
longer waits for its longest answer, and finished rows stop costing compute.

What is kept from lm-eval: prompts sorted longest first, the tokenizer's own special-token default,
prompts left-truncated to ``max_length - max_new_tokens`` tokens, greedy argmax (no sampling, no
repetition penalty), stop at EOS, the stop test on the decoded generation (special tokens kept, so
``"<|im_end|>"`` can match), and the final text decoded without special tokens and cut at the first
occurrence of any stop sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rankwise.evaluation.engine import _select_cache, index_batches, inference, max_model_length, pad_token_id
from rankwise.models.forward import cache_kwargs, output_cache

Progress = Callable[[int], None]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence (lm-eval's ``postprocess_generated_text``)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    until: Sequence[str],
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (EOS excluded), stopping each row on its own."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    n = len(prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    mask, positions = mask.to(device), positions.to(device)
    out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions, **cache_kwargs(model, None))
    cache = output_cache(out)
    token = out.logits[:, -1].argmax(-1)
    last = positions[:, -1]
    active = list(range(n))
    generated: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        keep: list[int] = []
        for row, seq in enumerate(active):
            tok = int(token[row])
            if tok in eos:
                continue
            generated[seq].append(tok)
            text = tokenizer.decode(generated[seq], skip_special_tokens=False)
            if len(generated[seq]) < max_new_tokens and not any(s and s in text for s in until):
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            cache = _select_cache(cache, rows, copy=False)
            mask, last, token = mask[rows], last[rows], token[rows]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last = last + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None],
                    **cache_kwargs(model, cache))
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1)
    return generated


def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    until: Sequence[str] = (),
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (in order), each cut at its first stop sequence.

    ``max_length`` is the model's context (default: lm-eval's resolution from the config); prompts are
    left-truncated so that prompt + ``max_new_tokens`` fits. ``progress`` gets the number of prompts
    finished after each batch.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    max_length = max_length or max_model_length(model, tokenizer)
    budget = max_length - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_length} tokens")
    encoded = [list(tokenizer(p, verbose=False)["input_ids"])[-budget:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), prompts[i]))
    eos, pad_id = _eos_ids(model, tokenizer), pad_token_id(tokenizer)
    texts: list[str] = [""] * len(prompts)
    with inference(model):
        for batch in index_batches(order, batch_size):
            outs = _generate_batch(model, tokenizer, [encoded[i] for i in batch], until, max_new_tokens,
                                   eos, pad_id)
            for i, toks in zip(batch, outs, strict=True):
                texts[i] = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), until)
            if progress is not None:
                progress(len(batch))
    return texts

"""Test helpers: tiny random-weight Llama models (shape and edge-case tests only) and an in-process CLI runner."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(*, vocab: int = 256, layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
               kv_heads: int = 2, max_positions: int = 256, tie: bool = True, seed: int = 0) -> nn.Module:
    """A random Llama with grouped-query attention (eval mode), seeded so tests are reproducible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def run_cli(argv: list[str], capsys) -> tuple[int | None, str, str]:
    """Run the ``rankwise`` command in this process: (exit code, stdout, stderr); code is 0 or None on success."""
    import pytest

    from rankwise.cli.main import run

    with pytest.raises(SystemExit) as info:
        run(list(argv))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err

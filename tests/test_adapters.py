"""Architecture adapters for both bundled models and the generic fallback."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from rankwise.models.adapters import BertAdapter, GenericAdapter, LlamaAdapter, adapter_for

LLAMA_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def test_llama_adapter_on_smollm(smollm):
    adapter = adapter_for(smollm.model)
    assert isinstance(adapter, LlamaAdapter)
    targets = adapter.targets()
    assert len(targets) == 30 * 7
    assert adapter.roles == ("q", "k", "v", "o", "gate", "up", "down")
    for t in targets:
        assert t.shape == LLAMA_SHAPES[t.role]
        assert adapter.linear(t.layer, t.role) is smollm.model.get_submodule(t.name)
    assert adapter.role_groups()["mlp"] == ("gate", "up", "down")


def test_bert_adapter_on_minilm(minilm):
    adapter = adapter_for(minilm.model)
    assert isinstance(adapter, BertAdapter)
    targets = adapter.targets()
    assert len(targets) == 6 * 6
    shapes = {t.role: t.shape for t in targets}
    assert shapes == {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384),
                      "up": (1536, 384), "down": (384, 1536)}
    assert all(t.bias for t in targets)
    assert targets[4].name == "encoder.layer.0.intermediate.dense"


def _tiny_opt() -> OPTForCausalLM:
    cfg = OPTConfig(hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=2, vocab_size=100,
                    word_embed_proj_dim=32, max_position_embeddings=64)
    return OPTForCausalLM(cfg)


def test_generic_fallback_on_family_without_adapter():
    model = _tiny_opt()
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter)  # OPT has no registered adapter
    assert adapter.blocks_path == "model.decoder.layers" and adapter.n_layers == 3
    assert set(adapter.roles) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.out_proj", "fc1", "fc2"}
    groups = adapter.role_groups()
    assert set(groups["mlp"]) == {"fc1", "fc2"} and len(groups["attn"]) == 4
    t = {x.role: x for x in adapter.targets() if x.layer == 1}
    assert t["fc1"].shape == (64, 32) and t["fc2"].shape == (32, 64)


def test_replace_swaps_through_parent():
    model = _tiny_opt()
    adapter = adapter_for(model)
    new = nn.Linear(32, 64)
    old = adapter.replace(2, "fc1", new)
    assert isinstance(old, nn.Linear) and adapter.linear(2, "fc1") is new
    assert model.model.decoder.layers[2].fc1 is new


def test_unknown_structure_is_a_clear_error():
    from rankwise.errors import PlanError

    with pytest.raises(PlanError, match="no list of blocks"):
        adapter_for(nn.Sequential(nn.ReLU()))

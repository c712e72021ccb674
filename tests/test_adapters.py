"""Architecture adapters: both bundled models by structure, the generic fallback, replacement, plug-ins.

tests/test_architectures.py covers 15 families end to end; this file checks the real bundled models.
"""

from __future__ import annotations

import pytest
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from rankwise.models.adapters import (
    ArchitectureAdapter,
    GenericAdapter,
    LayoutAdapter,
    adapter_for,
    register_adapter,
)

LLAMA_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def test_llama_adapter_on_smollm(smollm):
    adapter = adapter_for(smollm.model)
    assert isinstance(adapter, LayoutAdapter) and adapter.blocks_path == "model.layers"
    targets = adapter.targets()
    assert len(targets) == 30 * 7
    assert adapter.roles == ("q", "k", "v", "o", "gate", "up", "down")
    for t in targets:
        assert t.shape == LLAMA_SHAPES[t.role]
        assert adapter.linear(t.layer, t.role) is smollm.model.get_submodule(t.name)
    assert adapter.role_groups()["mlp"] == ("gate", "up", "down")


def test_bert_adapter_on_minilm(minilm):
    adapter = adapter_for(minilm.model)
    assert isinstance(adapter, LayoutAdapter) and adapter.blocks_path == "encoder.layer"
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


def test_family_without_any_adapter_code_gets_canonical_roles():
    """OPT (fc1/fc2, out_proj) is named nowhere in rankwise: its roles come from what its blocks contain."""
    model = _tiny_opt()
    adapter = adapter_for(model)
    assert isinstance(adapter, LayoutAdapter)
    assert adapter.blocks_path == "model.decoder.layers" and adapter.n_layers == 3
    assert adapter.roles == ("q", "k", "v", "o", "up", "down")
    assert adapter.role_groups()["mlp"] == ("up", "down")
    t = {x.role: x for x in adapter.targets() if x.layer == 1}
    assert t["up"].shape == (64, 32) and t["down"].shape == (32, 64)
    assert t["o"].name == "model.decoder.layers.1.self_attn.out_proj"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.readout = nn.Linear(8, 4)


def test_generic_fallback_on_unknown_layout():
    model = nn.Module()
    model.trunk = nn.ModuleList(_Block() for _ in range(2))
    model.heads = nn.ModuleList(_Block() for _ in range(4))  # the longest identical list wins
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.blocks_path == "heads" and adapter.n_layers == 4
    assert adapter.roles == ("mixer.0", "mixer.2", "readout")
    assert adapter.role_groups()["attn"] == ()
    assert adapter.layer_of("heads.3.readout.weight") == 3 and adapter.layer_of("trunk.0.readout.weight") is None


def test_replace_swaps_through_parent():
    model = _tiny_opt()
    adapter = adapter_for(model)
    new = nn.Linear(32, 64)
    old = adapter.replace(2, "up", new)
    assert isinstance(old, nn.Linear) and adapter.linear(2, "up") is new
    assert model.model.decoder.layers[2].fc1 is new


def test_unknown_structure_is_a_clear_error():
    from rankwise.errors import PlanError

    with pytest.raises(PlanError, match="no list of blocks"):
        adapter_for(nn.Sequential(nn.ReLU()))


def test_registered_adapter_wins_over_structure():
    class Renamed(ArchitectureAdapter):
        model_types = ("opt",)
        block_paths = ("model.decoder.layers",)
        role_paths = {"first": "fc1", "second": "fc2"}  # noqa: RUF012

    from rankwise.models import adapters

    register_adapter(Renamed)
    try:
        adapter = adapter_for(_tiny_opt())
        assert isinstance(adapter, Renamed) and adapter.roles == ("first", "second")
    finally:
        del adapters._REGISTRY["opt"]


def test_missing_role_in_a_layer_is_a_plan_error():
    from transformers import T5Config, T5Model

    from rankwise.errors import PlanError

    model = T5Model(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    adapter = adapter_for(model)
    assert adapter.stacks == (("encoder.block", 0), ("decoder.block", 1))
    assert "cross_q" not in adapter.roles_of(0) and "cross_q" in adapter.roles_of(1)
    with pytest.raises(PlanError, match="layer 0 has no cross_q"):
        adapter.linear(0, "cross_q")

"""Canonical roles by structure on 15 transformers families (tiny random models), end to end.

For each family: the adapter finds the blocks and gives canonical roles with the right (out, in) shapes; a
full-rank decomposition of every target reproduces the dense model (so each role names the right module,
the right way round, GPT-2's transposed Conv1D included); a low-rank plan written in canonical roles
decomposes what it names; the checkpoint (saved without a tokenizer) reloads three ways - rankwise.load,
plain ``AutoModel*.from_pretrained`` after ``import rankwise`` and ``trust_remote_code=True`` - computing
exactly what the in-memory model computes. Tiny configs (hidden 32, 2 layers per stack): fast lane.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from torch import nn

import rankwise
from helpers import run_cli
from rankwise.checkpoint import save
from rankwise.decomposition.apply import decompose_ as decompose
from rankwise.design.plan import Plan
from rankwise.errors import ModelLoadError
from rankwise.layers.factorized import FactorizedLinear
from rankwise.models.adapters import GenericAdapter, LayoutAdapter, adapter_for
from rankwise.models.layouts import is_transposed

H = 32  # hidden size of every tiny model
DECODER = ("q", "k", "v", "o", "gate", "up", "down")
FUSED = ("qkv", "o", "up", "down")
PLAIN_MLP = ("q", "k", "v", "o", "up", "down")
CROSS = ("cross_q", "cross_k", "cross_v", "cross_o")


@dataclass(frozen=True)
class Arch:
    """One family: how to build it tiny, what the adapter must say about it, how to run it."""

    config: str
    model: str
    kwargs: dict
    roles: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]  # (out, in) per role
    n_layers: int = 2
    auto: str = "AutoModelForCausalLM"
    seq2seq: bool = False
    check: Callable[[nn.Module], None] | None = field(default=None, compare=False)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        cfg = getattr(transformers, self.config)(**self.kwargs)
        return getattr(transformers, self.model)(cfg).eval()


def _llama_like(**extra) -> dict:
    base = dict(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, max_position_embeddings=64)
    return base | extra


GQA1 = {"q": (32, 32), "k": (8, 32), "v": (8, 32), "o": (32, 32), "gate": (64, 32), "up": (64, 32),
        "down": (32, 64)}

ARCHS: dict[str, Arch] = {
    # tied embeddings, GQA with a single KV head
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", _llama_like(tie_word_embeddings=True), DECODER, GQA1),
    # sliding-window attention
    "mistral": Arch("MistralConfig", "MistralForCausalLM", _llama_like(sliding_window=4), DECODER, GQA1),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", _llama_like(), DECODER, GQA1),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", _llama_like(head_dim=8), DECODER, GQA1),
    # a 256k vocabulary (Gemma's) on a tiny hidden size: embeddings dominate, roles unchanged
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", _llama_like(vocab_size=256_000, head_dim=8), DECODER, GQA1),
    "gemma3": Arch("Gemma3TextConfig", "Gemma3ForCausalLM",
                   _llama_like(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
                   DECODER, GQA1),
    # fused qkv_proj and gate_up_proj, decomposed as one matrix each
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", _llama_like(num_key_value_heads=2, pad_token_id=0),
                 ("qkv", "o", "gate_up", "down"), {"qkv": (64, 32), "o": (32, 32), "gate_up": (128, 32),
                                                   "down": (32, 64)}),
    "phi": Arch("PhiConfig", "PhiForCausalLM", _llama_like(num_key_value_heads=4), PLAIN_MLP,
                {"q": (32, 32), "o": (32, 32), "up": (64, 32), "down": (32, 64)}),
    "olmo2": Arch("Olmo2Config", "Olmo2ForCausalLM", _llama_like(), DECODER, GQA1),
    # Conv1D: weights stored (in, out); tied embeddings
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=H, n_layer=2, n_head=4,
                                                       n_positions=64),
                 FUSED, {"qkv": (96, 32), "o": (32, 32), "up": (128, 32), "down": (32, 128)},
                 check=lambda m: _assert(is_transposed(m.transformer.h[0].attn.c_attn))),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=128, hidden_size=H, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4),
                     FUSED, {"qkv": (96, 32), "o": (32, 32), "up": (64, 32), "down": (32, 64)}),
    # multi-query fused projection (one KV head): q 32 + k 8 + v 8 rows
    "falcon": Arch("FalconConfig", "FalconForCausalLM", dict(vocab_size=128, hidden_size=H, num_hidden_layers=2,
                                                             num_attention_heads=4),
                   FUSED, {"qkv": (48, 32), "o": (32, 32), "up": (128, 32), "down": (32, 128)}),
    "opt": Arch("OPTConfig", "OPTForCausalLM", dict(vocab_size=128, hidden_size=H, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, word_embed_proj_dim=H),
                PLAIN_MLP, {"q": (32, 32), "k": (32, 32), "o": (32, 32), "up": (64, 32), "down": (32, 64)}),
    "bert": Arch("BertConfig", "BertModel", dict(vocab_size=128, hidden_size=H, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64),
                 PLAIN_MLP, {"q": (32, 32), "o": (32, 32), "up": (64, 32), "down": (32, 64)}, auto="AutoModel"),
    # encoder-decoder: encoder blocks are layers 0-1, decoder blocks 2-3 (with cross-attention); gated MLP
    "t5": Arch("T5Config", "T5Model", dict(vocab_size=128, d_model=H, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                           feed_forward_proj="gated-gelu"),
               ("q", "k", "v", "o", *CROSS, "gate", "up", "down"),
               {"q": (32, 32), "cross_k": (32, 32), "gate": (64, 32), "up": (64, 32), "down": (32, 64)},
               n_layers=4, auto="AutoModel", seq2seq=True),
}


def _assert(condition: bool) -> None:
    assert condition


def _inputs(arch: Arch) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 8), generator=gen)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if arch.seq2seq else {"input_ids": ids}


def _run(model: nn.Module, arch: Arch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(arch))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=sorted(ARCHS), scope="module")
def arch(request) -> tuple[str, Arch]:
    return request.param, ARCHS[request.param]


def test_roles_and_shapes_by_structure(arch):
    name, spec = arch
    model = spec.build()
    adapter = adapter_for(model)
    assert isinstance(adapter, LayoutAdapter), name
    assert adapter.roles == spec.roles
    assert adapter.n_layers == spec.n_layers
    targets = adapter.targets()
    for t in targets:
        if t.role in spec.shapes:
            assert t.shape == spec.shapes[t.role], (t.layer, t.role)
        assert tuple(adapter.weight(t.layer, t.role).shape) == t.shape
        assert adapter.module_name(t.layer, t.role) == t.name
        assert model.get_submodule(t.name) is adapter.linear(t.layer, t.role)
        assert adapter.layer_of(t.name + ".weight") == t.layer
    if spec.check is not None:
        spec.check(model)
    groups = adapter.role_groups()
    assert set(groups["attn"]) | set(groups["mlp"]) == set(spec.roles)
    assert {"o", "down"} <= set(groups["attn"]) ^ set(groups["mlp"])


def test_full_rank_decomposition_reproduces_the_model(arch):
    """Every role decomposed at full rank: same function, so each role maps to the right (out, in) matrix."""
    _, spec = arch
    model = spec.build()
    dense = _run(model, spec)
    adapter = adapter_for(model)
    full = {t.role: min(t.shape) for t in adapter.targets()}  # the same shape for a role in every layer
    plan = Plan.from_dict({"layers": "all", "tensors": [spec.roles[0]], "rank": full[spec.roles[0]],
                           "method": "svd", "force": True,
                           "overrides": [{"layers": "all", "tensors": [r], "rank": full[r]} for r in spec.roles]})
    report = decompose(model, plan, progress=False)
    assert len([t for t in report.targets if not t.kept_dense]) == len(adapter.targets())
    assert all(isinstance(adapter.linear(t.layer, t.role), FactorizedLinear) for t in adapter.targets())
    assert torch.allclose(_run(model, spec), dense, atol=2e-4, rtol=1e-4)


def _low_rank_plan(spec: Arch) -> Plan:
    attn = [r for r in spec.roles if r in ("q", "k", "v", "o", "qkv")]
    mlp = [r for r in spec.roles if r in ("gate", "up", "down", "gate_up")]
    overrides = [{"layers": [spec.n_layers - 1], "tensors": mlp, "rank": 3, "method": "svd"}]
    if "cross_q" in spec.roles:
        overrides.append({"layers": "all", "tensors": ["cross_q", "cross_o"], "rank": 2})  # decoder blocks only
    return Plan.from_dict({"layers": "all", "tensors": attn, "rank": 2, "method": "tucker",
                           "overrides": overrides})


@pytest.fixture(scope="module")
def saved(arch, tmp_path_factory):
    """The family decomposed in memory by a low-rank plan in canonical roles, and its checkpoint (no tokenizer)."""
    name, spec = arch
    model = spec.build()
    report = decompose(model, _low_rank_plan(spec), progress=False)
    out = save(model, tmp_path_factory.mktemp(name) / "ckpt")
    return spec, model, report, out, _run(model, spec)


def test_low_rank_plan_in_canonical_roles(saved):
    spec, model, report, out, _ = saved
    adapter = adapter_for(model)
    decomposed = {(t.layer, t.role) for t in report.targets if not t.kept_dense}
    attn = {r for r in spec.roles if r in ("q", "k", "v", "o", "qkv")}
    expected = {(t.layer, t.role) for t in adapter.targets()
                if t.role in attn or (t.layer == spec.n_layers - 1 and t.role in ("gate", "up", "down", "gate_up"))
                or t.role in ("cross_q", "cross_o")}
    assert decomposed == expected
    if "cross_q" in spec.roles:  # encoder blocks have no cross-attention; the plan's "all" skips them
        assert {layer for layer, role in decomposed if role == "cross_q"} == {2, 3}
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert set(modules) == {adapter.module_name(layer, role) for layer, role in decomposed}
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()


def test_reload_with_rankwise_load(saved):
    spec, model, report, out, logits = saved
    loaded = rankwise.load(out)
    assert not loaded.tokenizer  # the folder has none: still loads
    assert loaded.info.n_params == report.params_after == sum(p.numel() for p in model.parameters())
    assert type(loaded.model).__name__ == type(model).__name__
    assert torch.equal(_run(loaded.model, spec), logits)


def test_reload_with_plain_transformers(saved):
    spec, model, _, out, logits = saved
    reloaded = getattr(transformers, spec.auto).from_pretrained(out)
    assert type(reloaded) is type(model)
    assert sum(isinstance(m, FactorizedLinear) for m in reloaded.modules()) == \
        sum(isinstance(m, FactorizedLinear) for m in model.modules())
    assert torch.equal(_run(reloaded.eval(), spec), logits)


def test_reload_with_trust_remote_code(saved):
    """The remote-code class (the file shipped in the folder) injects its own factorized layers."""
    spec, model, _, out, logits = saved
    reloaded = getattr(transformers, spec.auto).from_pretrained(out, trust_remote_code=True)
    assert type(reloaded).__name__ == f"Rankwise{type(model).__name__}"
    remote = [m for m in reloaded.modules() if type(m).__name__ == "FactorizedLinear"]
    assert remote and all(type(m).__module__.startswith("transformers_modules") for m in remote)
    assert torch.equal(_run(reloaded.eval(), spec), logits)


# --- generic fallback and edge cases ----------------------------------------------------------------------
class _OddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 16)
        self.unmix = nn.Linear(16, 8)


class _OddModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(_OddBlock() for _ in range(3))


def test_unknown_layout_falls_back_to_module_names():
    adapter = adapter_for(_OddModel())
    assert isinstance(adapter, GenericAdapter)
    assert adapter.roles == ("mix", "unmix") and adapter.n_layers == 3 and adapter.blocks_path == "stages"


def test_roles_survive_decomposition():
    """Re-reading a decomposed model (factorized layers in place of Linears) gives the same targets."""
    spec = ARCHS["gpt2"]
    model = spec.build()
    before = adapter_for(model).targets()
    decompose(model, Plan.simple(tensors=["qkv", "down"], rank=2, method="svd"), progress=False)
    assert adapter_for(model).targets() == before


def test_folder_without_tokenizer_inspects_decomposes_and_says_what_needs_text(tmp_path, capsys):
    spec = ARCHS["llama"]
    base = tmp_path / "dense"
    save(spec.build(), base)  # config.json + model.safetensors, no tokenizer files
    code, stdout, err = run_cli(["inspect", str(base), "--json"], capsys)
    assert code in (0, None), err
    assert json.loads(stdout)["roles"] == list(spec.roles)
    code, _, err = run_cli(["decompose", str(base), "--layers", "all", "--tensors", "q,k,v,o", "--rank", "2",
                            "-o", str(tmp_path / "low"), "-q"], capsys)
    assert code in (0, None), err
    assert rankwise.checkpoint.is_checkpoint(tmp_path / "low")
    code, _, err = run_cli(["decompose", str(base), "--layers", "all", "--tensors", "q", "--rank", "2",
                            "--method", "asvd", "--calib-seq-len", "16", "--calib-samples", "2",
                            "-o", str(tmp_path / "asvd"), "-q"], capsys)
    assert code == 2 and "has no tokenizer" in err and "Traceback" not in err
    code, _, err = run_cli(["eval", str(base), "--tasks", "arc_easy", "--limit", "2"], capsys)
    assert code == 2 and "has no tokenizer" in err and err.count("\n") == 1
    loaded = rankwise.load(base)
    with pytest.raises(ModelLoadError, match=r"has no tokenizer \(no tokenizer files in the folder\)"):
        loaded.tokenizer("text")
    copy.deepcopy(loaded.tokenizer)  # a missing tokenizer still copies (models are deep-copied with theirs)


def test_merged_conv1d_model_saves_and_reloads_as_its_architecture(tmp_path):
    """Merging puts a Conv1D back where GPT-2 has one (not an nn.Linear with the weight the other way round),
    so the merged model saves as GPT-2 and reloads computing the same; a reloaded checkpoint merges the same."""
    spec = ARCHS["gpt2"]
    model = spec.build()
    decompose(model, Plan.simple(tensors="all", rank=4, method="svd"), progress=False)
    out = save(model, tmp_path / "low")
    rankwise.merge(model)
    assert is_transposed(model.transformer.h[1].attn.c_proj) and is_transposed(model.transformer.h[0].mlp.c_fc)
    merged = _run(model, spec)
    save(model, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_run(reloaded, spec), merged, atol=1e-6, rtol=1e-5)
    loaded = rankwise.load(out).model
    rankwise.merge(loaded)
    assert is_transposed(loaded.transformer.h[0].attn.c_attn)
    assert torch.allclose(_run(loaded, spec), merged, atol=1e-6, rtol=1e-5)


def test_no_architecture_is_named_outside_the_layout_table():
    """Roles come from structure: no string in src/rankwise (docstrings aside) is a language-model family's
    model_type or class name, except in the one table of module-name patterns (models/layouts.py)."""
    import ast
    from pathlib import Path

    from transformers.models.auto import modeling_auto as auto

    mappings = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    names = {key.lower() for mapping in mappings for key in mapping}
    names |= {cls.lower() for mapping in mappings for value in mapping.values()
              for cls in (value if isinstance(value, tuple | list) else (value,))}
    package = Path(rankwise.__file__).parent
    found = []
    for path in package.rglob("*.py"):
        if path == package / "models" / "layouts.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.body and isinstance(node.body[0], ast.Expr)}
        found += [f"{path.relative_to(package)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docstrings and node.value.lower() in names]
    assert not found, found


@pytest.mark.parametrize("method", ["asvd", "svd-llm", "fwsvd"])
def test_data_aware_methods_on_conv1d(method):
    """Activation statistics are per input channel and Fisher gradients come (in, out) from a Conv1D: both must
    meet the (out, in) matrix the right way round (c_fc is 128x32: a wrong orientation cannot pass)."""
    spec = ARCHS["gpt2"]
    model = spec.build()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    report = decompose(model, Plan.simple(tensors=["qkv", "up", "down"], rank=8, method=method), calibration=calib,
                       progress=False, use_cache=False)
    assert len(report.targets) == 6 and not any(t.kept_dense for t in report.targets)
    assert all(0 < t.weighted_error < 1 for t in report.targets)
    assert torch.isfinite(_run(model, spec)).all()

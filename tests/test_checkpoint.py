"""The paper's rank-1 point on the default model through the CLI, and the checkpoint loading three ways.

``rankwise decompose smollm2-135m --layers 2,17,29 --tensors all --rank 1 --method tucker -o OUT`` must
remove exactly what r(m+n)+r² predicts for the 21 matrices, and OUT must reload (rankwise.load; plain
transformers after ``import rankwise``; ``trust_remote_code`` in a process that never imports rankwise)
with logits bit-identical to the model decomposed in memory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import rankwise
from rankwise.checkpoint import CheckpointError, is_checkpoint
from rankwise.design.plan import Plan
from rankwise.layers.factorized import FactorizedLinear
from rankwise.models.adapters import adapter_for

PAPER_LAYERS = (2, 17, 29)
SMOLLM_PARAMS = 134_515_008
PROMPT = "The European lobster is a species of clawed lobster from the eastern Atlantic Ocean"


@pytest.fixture(scope="module")
def paper(smollm, tmp_path_factory):
    """OUT written by the CLI, and the same plan applied in memory to a copy of the default model."""
    from rankwise.cli.main import run

    root = tmp_path_factory.mktemp("paper")
    out = root / "OUT"
    with pytest.raises(SystemExit) as exc:
        run(["decompose", "smollm2-135m", "--layers", "2,17,29", "--tensors", "all", "--rank", "1",
             "--method", "tucker", "-o", str(out), "-q"])
    assert exc.value.code in (0, None)
    model = copy.deepcopy(smollm.model)
    shapes = [t.shape for t in adapter_for(model).targets() if t.layer in PAPER_LAYERS]
    report = rankwise.decompose(model, Plan.simple(layers=list(PAPER_LAYERS), tensors="all", rank=1,
                                                   method="tucker"), progress=False)
    ids = smollm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return SimpleNamespace(out=out, root=root, model=model, report=report, ids=ids, logits=logits, shapes=shapes)


def test_paper_point_removes_exactly_what_the_formula_predicts(paper):
    # 21 matrices (7 roles × 3 layers) of SmolLM2-135M: q, o 576×576; k, v 192×576; gate, up 1536×576; down 576×1536
    assert len(paper.shapes) == 21
    predicted = sum(m * n - (1 * (m + n) + 1 * 1) for m, n in paper.shapes)
    assert predicted == 10_586_283
    on_disk = json.loads((paper.out / "decomposition_report.json").read_text())
    for report in (paper.report.summary(), on_disk["summary"]):
        assert report["targets_decomposed"] == 21 and report["targets_kept_dense"] == 0
        assert report["params_before"] == SMOLLM_PARAMS
        assert report["params_removed"] == predicted
        assert report["params_after"] == SMOLLM_PARAMS - predicted == 123_928_725
        # the embedding (28.3M of 134.5M) dominates this small model: 7.870% of it, not Llama-2-7B's 9%
        assert round(report["reduction_pct_of_whole_model"], 3) == 7.870
    assert sum(p.numel() for p in paper.model.parameters()) == SMOLLM_PARAMS - predicted
    assert all(t.form == "three_factor" and t.ranks == (1, 1) for t in paper.report.targets)
    assert on_disk["targets"] == [t.to_dict() | {"seconds": d["seconds"]}
                                  for t, d in zip(paper.report.targets, on_disk["targets"], strict=True)]


def test_checkpoint_stores_only_factors(paper):
    config = json.loads((paper.out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "rankwise" and qc["version"] == 1
    assert qc["plan"] == {"method": {"name": "tucker", "solver": "auto", "oversample": 2}, "rank": 1,
                          "layers": "2,17,29", "tensors": "all"}
    assert len(qc["modules"]) == 21
    assert qc["modules"]["model.layers.2.self_attn.k_proj"] == {
        "in_features": 576, "out_features": 192, "rank_out": 1, "rank_in": 1, "form": "three_factor", "bias": False}
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_rankwise.RankwiseLlamaForCausalLM"}
    assert config["dtype"] == "float32"
    weights = paper.out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    assert "model.layers.2.self_attn.q_proj.weight" not in keys  # no dense copy of a decomposed weight
    assert {"model.layers.2.self_attn.q_proj.first.weight", "model.layers.2.self_attn.q_proj.core.weight",
            "model.layers.2.self_attn.q_proj.last.weight"} <= keys
    assert "lm_head.weight" not in keys  # tied to the embedding: stored once
    assert stored == 123_928_725
    assert 0 <= weights.stat().st_size - 4 * stored < 100_000  # float32 tensors plus a small header
    assert (paper.out / "tokenizer.json").is_file() and (paper.out / "modeling_rankwise.py").is_file()
    assert is_checkpoint(paper.out)
    assert not [p for p in paper.root.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_reload_with_rankwise_load(paper):
    loaded = rankwise.load(paper.out)
    assert loaded.info.n_params == 123_928_725 and loaded.info.dtype == "float32"
    assert isinstance(loaded.model.model.layers[17].mlp.down_proj, FactorizedLinear)
    with torch.no_grad():
        logits = loaded.model(input_ids=paper.ids).logits
    assert torch.equal(logits, paper.logits)
    # merge() gives back a plain dense model of the original size computing (nearly) the same function
    rankwise.merge(loaded.model)
    assert sum(p.numel() for p in loaded.model.parameters()) == SMOLLM_PARAMS
    assert not any(isinstance(m, FactorizedLinear) for m in loaded.model.modules())
    assert not hasattr(loaded.model.config, "quantization_config")
    with torch.no_grad():
        merged = loaded.model(input_ids=paper.ids).logits
    assert torch.allclose(merged, paper.logits, atol=1e-3, rtol=1e-4)


def _subprocess(code: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf_modules"), TRANSFORMERS_VERBOSITY="warning",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp)


def _check_logits(paper, result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Unknown quantization type" not in result.stderr
    logits = load_file(str(path))["logits"]
    assert torch.equal(logits, paper.logits)


def test_reload_with_plain_transformers_after_import_rankwise(paper, tmp_path):
    result = _subprocess(f"""
        import torch, rankwise
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        from rankwise.layers import FactorizedLinear
        model = AutoModelForCausalLM.from_pretrained({str(paper.out)!r})
        assert type(model).__name__ == "LlamaForCausalLM", type(model)
        assert isinstance(model.model.layers[2].self_attn.q_proj, FactorizedLinear)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({paper.ids.tolist()})).logits
        save_file({{"logits": logits.contiguous()}}, "logits.safetensors")
    """, tmp_path)
    _check_logits(paper, result, tmp_path / "logits.safetensors")


def test_reload_with_trust_remote_code_without_rankwise(paper, tmp_path):
    result = _subprocess(f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(paper.out)!r}, trust_remote_code=True)
        assert type(model).__name__ == "RankwiseLlamaForCausalLM", type(model)
        assert type(model.model.layers[2].self_attn.q_proj).__module__.startswith("transformers_modules")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({paper.ids.tolist()})).logits
        save_file({{"logits": logits.contiguous()}}, "logits.safetensors")
        leaked = sorted(m for m in sys.modules if m == "rankwise" or m.startswith("rankwise."))
        assert not leaked, leaked
    """, tmp_path)
    _check_logits(paper, result, tmp_path / "logits.safetensors")


def test_encoder_checkpoint_round_trip(minilm, tmp_path):
    """A BERT encoder decomposed with SVD saves with AutoModel in its auto_map and reloads exactly."""
    model = copy.deepcopy(minilm.model)
    report = rankwise.decompose(model, Plan.simple(layers=[0, 5], tensors=["q", "up"], rank=16, method="svd"),
                                progress=False)
    out = rankwise.save(model, tmp_path / "mini", tokenizer=minilm.tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_rankwise.RankwiseBertModel"}
    loaded = rankwise.load(out)
    assert loaded.info.kind == "encoder" and loaded.info.n_params == report.params_after
    batch = minilm.tokenizer(["a lobster is a crustacean", "rankwise"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_save_refuses_to_clobber_and_replaces_atomically(minilm, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    model = copy.deepcopy(minilm.model)
    with pytest.raises(CheckpointError, match="already exists"):
        rankwise.save(model, out)
    with pytest.raises(CheckpointError, match="not a folder rankwise wrote"):  # user files are never replaced
        rankwise.save(model, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    rankwise.save(model, out, tokenizer=minilm.tokenizer)
    (out / "stale.txt").write_text("old")
    rankwise.save(model, out, tokenizer=minilm.tokenizer, overwrite=True)  # a checkpoint rankwise wrote
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or trash folders left
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        rankwise.save(model, tmp_path / "file", overwrite=True)

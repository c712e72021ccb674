"""Model zoo: every loading path (alias, local folder, GGUF file, cache hit) and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankwise.errors import ModelLoadError
from rankwise.models import BUNDLED, load, zoo

RANKWISE = [sys.executable, "-m", "rankwise"]


def test_alias_default_model(smollm):
    model, tokenizer, info = smollm
    assert info.architecture == "llama" and info.kind == "causal-lm"
    assert info.n_params == 134_515_008
    assert info.n_layers == 30 and info.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # A real, trained model: " Paris" is among its top predictions.
    top = tokenizer.convert_ids_to_tokens(logits[0, -1].topk(5).indices.tolist())
    assert any("Paris" in t for t in top), top


def test_alias_encoder(minilm):
    _, _, info = minilm
    assert info.architecture == "bert" and info.kind == "encoder"
    assert info.n_layers == 6 and info.hidden_size == 384


def test_local_folder_and_dtype(tmp_path):
    folder = BUNDLED["minilm-l6"].locate()
    loaded = load(str(folder), dtype="bfloat16")
    assert loaded.info.dtype == "bfloat16" and loaded.info.architecture == "bert"
    assert loaded.info.kind == "encoder"  # from config.architectures = [BertModel]


def test_local_causal_folder_roundtrip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "m")
    shutil.copytree(BUNDLED["minilm-l6"].locate(), tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tmp_path / "tok" / name, tmp_path / "m" / name)
    loaded = load(tmp_path / "m")
    assert loaded.info.kind == "causal-lm" and loaded.info.n_layers == 2
    for (n1, p1), (_, p2) in zip(model.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


@pytest.mark.slow  # real GGUF conversion / CLI start-up per case
def test_gguf_file_converts_once_then_hits_cache(tmp_path, monkeypatch):
    """A .gguf path converts into $RANKWISE_CACHE keyed by content hash; the second load is a cache hit."""
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    gguf = BUNDLED["smollm2-135m"].locate()
    calls = []
    real_convert = zoo._convert_gguf
    monkeypatch.setattr(zoo, "_convert_gguf", lambda *a: (calls.append(a), real_convert(*a)))
    first = load(str(gguf))
    assert len(calls) == 1
    digest = zoo.file_sha256(gguf)
    folder = tmp_path / "cache" / "gguf" / digest[:32]
    assert (folder / "rankwise-source.json").is_file() and any(folder.glob("*.safetensors"))
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".convert-")]  # no half-written folder
    second = load(str(gguf))
    assert len(calls) == 1, "second load must not convert again"
    assert first.info.n_params == second.info.n_params == 134_515_008
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_bad_inputs_raise_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file or folder"):
        load(str(tmp_path / "missing"))
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF not really" * 10)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load(str(bad_gguf))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load("minilm-l6", dtype="int3")


def _corrupt_safetensors_folder(tmp_path: Path) -> Path:
    src = BUNDLED["minilm-l6"].locate()
    folder = tmp_path / "corrupt"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\0" * 64)
    return folder


def test_corrupt_safetensors(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load(str(_corrupt_safetensors_folder(tmp_path)))


@pytest.mark.slow  # real GGUF conversion / CLI start-up per case
@pytest.mark.parametrize(
    "spec, expect",
    [
        ("no-such-alias-xyz", "unknown model 'no-such-alias-xyz'"),
        ("./does/not/exist", "no such model file or folder"),
        ("CORRUPT", "cannot load model"),
        ("BADGGUF", "cannot read GGUF file"),
    ],
)
def test_cli_bad_model_exit_2(tmp_path, spec, expect):
    if spec == "CORRUPT":
        spec = str(_corrupt_safetensors_folder(tmp_path))
    elif spec == "BADGGUF":
        spec = str(tmp_path / "x.gguf")
        Path(spec).write_bytes(b"\0" * 100)
    proc = subprocess.run([*RANKWISE, "inspect", spec, "--json"], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_model_info_is_json(smollm):
    assert json.loads(json.dumps(smollm.info.to_dict()))["n_params"] == 134_515_008

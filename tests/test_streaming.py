"""Streaming decomposition (one block at a time from safetensors) against the whole-model path, and its memory.

Equality: the streaming output must be the checkpoint the whole-model ``decompose`` + ``save`` writes (same
tensors, same config.json, same report numbers): bit-for-bit for data-free methods, and for SVD-LLM too
(the block-by-block statistics are summed over the same batches in the same order). Tiny random models
cover shapes, sharded sources, sequential calibration, disk offload and refusals in seconds; the real
SmolLM2-135M covers the real thing (slow).

Memory: a checkpoint of SmolLM2's blocks repeated to >= 4x a memory limit is decomposed in streaming mode
in a subprocess under ``RLIMIT_DATA`` (why not RLIMIT_AS: torch and its thread pools reserve gigabytes of
address space they never touch, so an address-space limit measures reservations, not memory; RLIMIT_DATA
counts the private writable memory that tensors live in). Loading the whole model under the same limit
must fail, so the test proves the limit binds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli, tiny_llama
from rankwise.errors import ModelLoadError, PlanError, RankwiseError

SHARD_SIZE = "150KB"  # tiny blocks are ~150 KB: several shards and an index


def _tiny_folder(path: Path, layers: int = 3, sharded: bool = True) -> Path:
    model = tiny_llama(layers=layers)
    if sharded:
        model.save_pretrained(path, max_shard_size=SHARD_SIZE)
    else:
        model.save_pretrained(path)
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _whole(src: Path, out: Path, plan: dict, calibration=None, dtype: str = "float32") -> dict:
    from rankwise.checkpoint import save
    from rankwise.decomposition.apply import decompose_ as decompose
    from rankwise.models import load

    loaded = load(str(src), dtype=dtype)
    report = decompose(loaded.model, plan, calibration, tokenizer=loaded.tokenizer, progress=False, use_cache=False)
    save(loaded.model, out, tokenizer=loaded.tokenizer, report=report)
    return report.summary()


def _stream(src: Path, out: Path, plan: dict, calibration=None, **kw) -> dict:
    from rankwise.decomposition.streaming import stream_decompose

    return stream_decompose(src, out, plan, calibration, progress=False, **kw).summary()


def _same_summary(a: dict, b: dict) -> None:
    a, b = dict(a), dict(b)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def _assert_same_checkpoint(streamed: Path, whole: Path, exact: bool = True) -> None:
    a, b = _tensors(streamed), _tensors(whole)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((streamed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    assert (streamed / "model.safetensors.index.json").is_file()


def _ids(n: int = 6, length: int = 24, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


# --- tiny models: equality, modes, refusals -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tucker", "svd"])
def test_data_free_streaming_equals_whole_model(tmp_path: Path, method: str) -> None:
    src = _tiny_folder(tmp_path / "src")
    plan = {"layers": [0, 2], "tensors": "all", "rank": 3, "method": method}
    s = _stream(src, tmp_path / "s", plan)
    w = _whole(src, tmp_path / "w", plan)
    _same_summary(s, w)
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w")


def test_svd_llm_streaming_equals_whole_model_one_file_source(tmp_path: Path) -> None:
    src = _tiny_folder(tmp_path / "src", sharded=False)
    plan = {"layers": "all", "tensors": ["q", "o", "down"], "rank": 4, "method": "svd-llm"}
    ids = _ids()
    s = _stream(src, tmp_path / "s", plan, ids)
    w = _whole(src, tmp_path / "w", plan, ids)
    assert s["mean_weighted_error"] == pytest.approx(w["mean_weighted_error"], rel=1e-6)
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w", exact=False)


def test_streamed_checkpoint_loads_and_computes_like_the_whole_model(tmp_path: Path) -> None:
    import rankwise

    src = _tiny_folder(tmp_path / "src")
    plan = {"layers": [1], "tensors": "mlp", "rank": 2, "method": "svd"}
    _stream(src, tmp_path / "s", plan)
    _whole(src, tmp_path / "w", plan)
    a, b = rankwise.load(str(tmp_path / "s")).model, rankwise.load(str(tmp_path / "w")).model
    ids = _ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_sequential_calibrates_each_block_on_the_compressed_earlier_blocks(tmp_path: Path) -> None:
    """Reference for sequential mode: the whole-model path run block by block, each run calibrating on
    the model whose earlier blocks are already decomposed."""
    from rankwise.checkpoint import save
    from rankwise.decomposition.apply import decompose_ as decompose
    from rankwise.models import load

    src = _tiny_folder(tmp_path / "src")
    ids = _ids()
    plan = {"layers": [0, 1], "tensors": ["q", "up"], "rank": 3, "method": "svd-llm"}
    _stream(src, tmp_path / "seq", plan, ids, sequential=True)
    _stream(src, tmp_path / "one", plan, ids)
    model = load(str(src)).model
    decompose(model, {**plan, "layers": [0]}, ids, progress=False, use_cache=False)
    decompose(model, {**plan, "layers": [1]}, ids, progress=False, use_cache=False)
    save(model, tmp_path / "ref")
    seq, one, ref = _tensors(tmp_path / "seq"), _tensors(tmp_path / "one"), _tensors(tmp_path / "ref")
    for key in ref:
        torch.testing.assert_close(seq[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    key = "model.layers.1.self_attn.q_proj.first.weight"
    assert not torch.allclose(seq[key], one[key], atol=1e-6)  # layer 1 saw different inputs in the two modes
    key0 = "model.layers.0.self_attn.q_proj.first.weight"
    assert torch.equal(seq[key0], one[key0])  # layer 0 sees the embeddings either way


def test_disk_offload_gives_the_same_checkpoint(tmp_path: Path) -> None:
    src = _tiny_folder(tmp_path / "src")
    plan = {"layers": [0, 2], "tensors": ["k", "down"], "rank": 2, "method": "asvd"}
    ids = _ids()
    _stream(src, tmp_path / "ram", plan, ids)
    _stream(src, tmp_path / "disk", plan, ids, offload="disk")
    a, b = _tensors(tmp_path / "ram"), _tensors(tmp_path / "disk")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "disk").glob(".rankwise-activations-*"))


def test_bfloat16_output_keeps_the_model_dtype(tmp_path: Path) -> None:
    src = _tiny_folder(tmp_path / "src")
    plan = {"layers": [0], "tensors": ["q"], "rank": 2, "method": "svd"}
    _stream(src, tmp_path / "s", plan, dtype="bfloat16")
    _whole(src, tmp_path / "w", plan, dtype="bfloat16")
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w")
    assert {t.dtype for t in _tensors(tmp_path / "s").values()} == {torch.bfloat16}


def test_refusals_are_one_line_errors_and_write_nothing(tmp_path: Path) -> None:
    src = _tiny_folder(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(PlanError, match="Fisher"):
        _stream(src, out, {"layers": [0], "tensors": ["q"], "rank": 2, "method": "fwsvd"}, _ids())
    _stream(src, tmp_path / "done", {"layers": [0], "tensors": ["q"], "rank": 2, "method": "svd"})
    with pytest.raises(PlanError, match="already a rankwise checkpoint"):
        _stream(tmp_path / "done", out, {"layers": [1], "tensors": ["q"], "rank": 2, "method": "svd"})
    with pytest.raises(ModelLoadError, match="not a model folder"):
        _stream(tmp_path, out, {"layers": [0], "tensors": ["q"], "rank": 2, "method": "svd"})
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="streaming needs"):
        _stream(tmp_path / "bare", out, {"layers": [0], "tensors": ["q"], "rank": 2, "method": "svd"})
    with pytest.raises(PlanError, match="offload"):
        _stream(src, out, {"layers": [0], "tensors": ["q"], "rank": 2, "method": "svd"}, offload="tape")
    # a tensor missing from the source is named, whichever block it is in
    broken = _tiny_folder(tmp_path / "broken", sharded=False)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        _stream(broken, out, {"layers": [0], "tensors": ["q"], "rank": 2, "method": "svd"})
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_cli_streaming_and_device_options(tmp_path: Path, capsys) -> None:
    import rankwise

    src = _tiny_folder(tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run_cli(["decompose", str(src), "-o", str(out), "--streaming", "--layers", "0,1", "--rank", "2",
                            "--method", "svd", "--device", "auto", "-q"], capsys)
    assert code in (0, None), err
    loaded = rankwise.load(str(out))
    assert type(loaded.model.model.layers[1].mlp.up_proj).__name__ == "FactorizedLinear"
    code, _, err = run_cli(["decompose", str(src), "-o", str(tmp_path / "x"), "--layers", "0", "--method", "svd",
                            "--sequential"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--streaming" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(["decompose", str(src), "-o", str(tmp_path / "y"), "--streaming", "--layers", "0",
                                "--device", "cuda"], capsys)
        assert code == 2 and err.startswith("error: --device cuda") and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_resolve_device() -> None:
    from rankwise.devices import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(RankwiseError, match="not a device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RankwiseError, match="no CUDA device"):
            resolve_device("cuda:0")



#: Every command that computes, with the arguments that reach its device check (study: the spec's device).
COMPUTING_COMMANDS = {
    "inspect": ["inspect", "{tiny}"],
    "decompose": ["decompose", "{tiny}", "-o", "{tmp}/out", "--layers", "0", "--rank", "2"],
    "eval": ["eval", "{tiny}", "--tasks", "arc_easy", "--limit", "2"],
    "bench": ["bench", "{tiny}"],
    "allocate": ["allocate", "{tiny}", "--budget", "0.5", "-o", "{tmp}/plan.yaml"],
    "paper": ["paper", "--plan"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", sorted(COMPUTING_COMMANDS))
def test_every_computing_command_takes_device(command: str, tmp_path: Path, capsys) -> None:
    tiny = _tiny_folder(tmp_path / "src")
    argv = [a.format(tiny=tiny, tmp=tmp_path) for a in COMPUTING_COMMANDS[command]]
    capsys.readouterr()  # the tiny model's save progress
    code, _, err = run_cli([*argv, "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("error: --device cuda: no CUDA device") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "plan.yaml").exists()


def test_stem_copied_in_chunks_is_what_safetensors_writes(tmp_path: Path) -> None:
    """The chunked stem copy (small chunks force many) gives the same tensors as safetensors' own writer, also
    when casting to another dtype, and the file loads with safetensors."""
    from safetensors.torch import save_file

    from rankwise.decomposition.streaming import SafetensorsSource

    gen = torch.Generator().manual_seed(0)
    tensors = {"emb.weight": torch.randn(37, 12, generator=gen), "norm.weight": torch.randn(12, generator=gen),
               "pos.ids": torch.arange(9, dtype=torch.int64)}
    (tmp_path / "src").mkdir()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "src" / "config.json").write_text("{}")
    src = SafetensorsSource.open(tmp_path / "src")
    for dtype in (torch.float32, torch.bfloat16):
        dest = tmp_path / f"stem-{dtype}.safetensors"
        sizes = src.copy_to_shard(tensors, dest, dtype, chunk_bytes=40)
        got = load_file(dest)
        assert set(got) == set(tensors)
        for key, t in tensors.items():
            want = t.to(dtype) if t.is_floating_point() else t
            assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
            assert sizes[key] == want.numel() * want.element_size()


def test_block_shard_written_from_tensor_memory_loads_with_safetensors(tmp_path: Path) -> None:
    """A block's shard, written tensor by tensor from their own memory, loads with safetensors with every
    dtype, shape and value (a non-contiguous view, a 0-d and an empty tensor included)."""
    from safetensors import safe_open

    from rankwise.decomposition.streaming import _save_shard

    gen = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
               "a.t": torch.randn(6, 4, generator=gen).T, "c.ids": torch.arange(11, dtype=torch.int64),
               "d.scalar": torch.tensor(2.5, dtype=torch.float16), "e.empty": torch.zeros(0, 3)}
    sizes = _save_shard(tmp_path / "x.safetensors", tensors)
    got = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for key, want in tensors.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape and torch.equal(got[key], want), key
        assert sizes[key] == want.numel() * want.element_size()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    from rankwise.decomposition.streaming import read_header

    for key, entry in read_header(tmp_path / "x.safetensors").items():  # aligned as save_file aligns
        assert entry["data_offsets"][0] % tensors[key].element_size() == 0, key


def test_safetensors_writer_refuses_what_would_corrupt_the_file(tmp_path: Path) -> None:
    """A short write, a name given twice, a dtype safetensors cannot hold: one-line errors."""
    from rankwise.decomposition.streaming import write_safetensors

    def short(key, dtype, out):
        out.write(b"\0" * 3)

    with pytest.raises(ModelLoadError, match="written with 3 bytes, not 8"):
        write_safetensors(tmp_path / "a.safetensors", [("x", torch.float32, [2])], short)
    with pytest.raises(ModelLoadError, match="given twice"):
        write_safetensors(tmp_path / "b.safetensors", [("x", torch.float32, [2]), ("x", torch.float32, [2])], short)
    with pytest.raises(ModelLoadError, match="cannot be stored in safetensors"):
        write_safetensors(tmp_path / "c.safetensors", [("x", torch.quint8, [2])], short)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_calibration_embedding_rows_give_the_full_tables_hidden_states(tmp_path: Path, family: str) -> None:
    """Block 0's inputs captured with only the calibration set's embedding rows (ids renumbered by a hook)
    equal those of the full table; OPT has a padding_idx and learned positions."""
    from safetensors.torch import save_file

    from rankwise.decomposition.streaming import SafetensorsSource, _embedding_keys, _embedding_rows

    if family == "llama":
        model = tiny_llama(vocab=256, layers=1)
    else:
        from transformers import OPTConfig, OPTForCausalLM

        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=1)).eval()
    emb = model.get_input_embeddings()
    key, head = _embedding_keys(model, emb)
    assert dict(model.named_parameters())[key] is emb.weight
    assert head == {"lm_head.weight"}  # tied to the embeddings: never read while capturing block inputs
    (tmp_path / "m").mkdir()
    save_file({key: emb.weight.detach().clone()}, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text("{}")
    ids = _ids(3, 10)
    ids[0, :3] = 1  # the padding id among the tokens
    with torch.no_grad():
        want = model.model.decoder.embed_tokens(ids) if family == "opt" else emb(ids)
        before = emb.weight
        with _embedding_rows(emb, SafetensorsSource.open(tmp_path / "m"), key, ids, torch.float32, "cpu"):
            assert emb.weight.shape[0] == len(torch.unique(ids)) < 256
            got = emb(ids)
        assert emb.weight is before
    assert torch.equal(got, want)

# --- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["tucker", "svd-llm"])
def test_real_model_streaming_equals_whole_model(tmp_path: Path, method: str) -> None:
    from rankwise.calibration.data import CalibrationConfig

    plan = {"layers": [0, 1], "tensors": ["q", "v", "down"], "rank": 8, "method": method}
    calibration = CalibrationConfig(n_samples=6, seq_len=64)
    s = _stream("smollm2-135m", tmp_path / "s", plan, calibration)
    w = _whole("smollm2-135m", tmp_path / "w", plan, calibration)
    _same_summary({k: v for k, v in s.items() if k != "mean_weighted_error"},
                  {k: v for k, v in w.items() if k != "mean_weighted_error"})
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w", exact=method == "tucker")
    # the streamed folder's tokenizer is the source's files, copied: it encodes as the whole-model save's
    from transformers import AutoTokenizer

    text = "Low-rank decomposition <|im_start|> without retraining.\n 3.14"
    assert (AutoTokenizer.from_pretrained(tmp_path / "s")(text)["input_ids"]
            == AutoTokenizer.from_pretrained(tmp_path / "w")(text)["input_ids"])


_LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
from rankwise.calibration.data import CalibrationConfig
mode, src, out = sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "whole":
    from rankwise.models import load
    load(src)
else:
    from rankwise.decomposition.streaming import stream_decompose
    import json
    plan = json.loads(sys.argv[5])
    stream_decompose(src, out, plan, CalibrationConfig(n_samples=4, seq_len=64), progress=False)
print("ok")
"""

#: RLIMIT_DATA. Unlimited, the streaming run below peaks at 424-431 MiB of data memory (VmData sampled every
#: 5 ms, five runs), of which ~190 MiB is the interpreter with torch and transformers imported. The plan
#: decomposes q of the first and the last block, so the calibration set flows through every block under
#: the limit. VmData counts the heap's whole span, freed pages included: before release_freed_memory's
#: 64 KiB mmap threshold, half the runs grew it ~2 MiB a block (a block forward's activations came from the
#: heap, under longer-lived allocations) and peaked at 600-730 MiB over 150 blocks.
MEMORY_LIMIT = 600 * 2**20
#: SmolLM2's blocks are 13.5 MiB in float32 and its stem 113 MiB: 170 blocks are 2,409 MiB, 4.01x the limit.
#: Disk: the model and its streamed copy, ~5 GB, each test's folder removed when it passes (pyproject's
#: tmp_path_retention_policy), so the suite never holds two of them.
BLOCKS = 170


def _free_disk_or_skip(folder: Path, needed: int) -> None:
    """Skip (with the numbers) where the disk cannot hold the test's files: filling it would fail every test
    running beside this one with ENOSPC, which is what a CI machine with a nearly full disk saw."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free disk under {folder}, has {free / 2**30:.1f} GiB")


@pytest.mark.slow
def test_streaming_a_model_four_times_the_memory_limit(tmp_path: Path) -> None:
    from rankwise.decomposition.streaming import repeat_blocks, stream_decompose

    _free_disk_or_skip(tmp_path, 2 * 4 * MEMORY_LIMIT + 2 * 2**30)  # model + streamed copy + 30-block copy
    big = tmp_path / "big"
    repeat_blocks("smollm2-135m", big, BLOCKS)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert size >= 4 * MEMORY_LIMIT, f"checkpoint {size / 2**20:.0f} MiB is not 4x the limit"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = textwrap.dedent(_LIMITED)

    def limited(mode: str, out: Path, plan: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, str(MEMORY_LIMIT), mode, str(big), str(out),
                               json.dumps(plan or {})], capture_output=True, text=True, env=env, timeout=1200)

    whole = limited("whole", tmp_path / "unused")
    assert whole.returncode != 0 and "ok" not in whole.stdout  # the limit binds: the whole model cannot load
    plan = {"layers": [0, BLOCKS - 1], "tensors": ["q"], "rank": 8, "method": "svd-llm"}
    run = limited("stream", tmp_path / "out", plan)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]

    # outside the limit: the checkpoint loads; dense blocks are copied bit for bit; layer 0 matches the
    # streaming decomposition of the original 30-block model (its inputs are the same embeddings)
    import rankwise
    from rankwise.decomposition.streaming import SafetensorsSource

    out = tmp_path / "out"
    loaded = rankwise.load(str(out)).model
    assert loaded.config.num_hidden_layers == BLOCKS
    assert type(loaded.model.layers[BLOCKS - 1].self_attn.q_proj).__name__ == "FactorizedLinear"
    key = "model.layers.100.mlp.down_proj.weight"
    assert torch.equal(loaded.model.layers[100].mlp.down_proj.weight,
                       SafetensorsSource.open(big).read([key], torch.float32)[key])
    del loaded
    from rankwise.calibration.data import CalibrationConfig

    stream_decompose("smollm2-135m", tmp_path / "small", {**plan, "layers": [0]},
                     CalibrationConfig(n_samples=4, seq_len=64), progress=False)
    got, ref = SafetensorsSource.open(out), SafetensorsSource.open(tmp_path / "small")
    keys = ["model.layers.0.self_attn.q_proj.first.weight", "model.layers.0.self_attn.q_proj.last.weight"]
    a, b = got.read(keys, torch.float32), ref.read(keys, torch.float32)
    # one thread there, this process's threads here: BLAS sums differ in the last bits, so compare the maps
    torch.testing.assert_close(a[keys[1]] @ a[keys[0]], b[keys[1]] @ b[keys[0]], rtol=1e-3, atol=1e-5)


def test_tokenizer_saved_by_copying_its_files(tmp_path: Path, minilm) -> None:
    """The streamed output's tokenizer is the source's files, copied: the bundled MiniLM's (vocab.txt,
    BertTokenizer) loads and encodes as the original; a class's own vocabulary files (LUKE's entity
    vocabulary) are copied too; a folder without a tokenizer gives none."""
    from transformers import AutoTokenizer

    from rankwise.decomposition.streaming import TokenizerFiles, source_folder

    out = tmp_path / "out"
    out.mkdir()
    files = TokenizerFiles(source_folder("minilm-l6"))
    assert files and {Path(p).name for p in files.save_pretrained(out)} >= {"vocab.txt", "tokenizer_config.json"}
    text = "Low-rank decomposition, without retraining: 3.14 dB."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == minilm.tokenizer(text)["input_ids"]

    luke = tmp_path / "luke"
    luke.mkdir()
    (luke / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LukeTokenizer"}))
    (luke / "entity_vocab.json").write_text("{}")
    (luke / "model.safetensors").write_text("not a tokenizer file")
    assert {p.name for p in TokenizerFiles(luke).files} == {"tokenizer_config.json", "entity_vocab.json"}
    assert not TokenizerFiles(_tiny_folder(tmp_path / "tiny"))

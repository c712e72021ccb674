"""Calibration: seeded windows of real text, statistics checked against direct computation, the cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rankwise.calibration import CalibrationConfig, cached_stats, calibration_ids, collect_stats
from rankwise.calibration.cache import cache_path, load_stats, model_fingerprint, stats_key
from rankwise.calibration.data import SOURCES, sample_windows
from rankwise.calibration.stats import batch_bounds
from rankwise.errors import DataError

Q1, K1, DOWN1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def windows(smollm, data_dir):
    """3 real WikiText-2 validation windows of 32 tokens (seed 0)."""
    return calibration_ids(smollm.tokenizer, CalibrationConfig(n_samples=3, seq_len=32, seed=0))


def _inputs_of(model, names, ids):
    """The inputs each named Linear receives, captured independently of rankwise (float64, tokens × n)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)  # all at once: a different batching than collect_stats
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_windows_are_seeded_slices_of_the_real_text(smollm, data_dir, windows):
    tok = smollm.tokenizer
    assert windows.shape == (3, 32) and windows.dtype == torch.int64
    again = calibration_ids(tok, CalibrationConfig(n_samples=3, seq_len=32, seed=0))
    other = calibration_ids(tok, CalibrationConfig(n_samples=3, seq_len=32, seed=1))
    assert torch.equal(windows, again)
    assert not torch.equal(windows, other)
    text = (data_dir / SOURCES["wikitext2"][0]).read_text(encoding="utf-8")
    checked = 0
    for row in torch.cat([windows, other]):
        piece = tok.decode(row.tolist(), clean_up_tokenization_spaces=False)
        if "\ufffd" not in piece:  # a window may cut a multi-byte character at its edges
            assert piece in text
            checked += 1
    assert checked >= 3


def test_user_files_and_bad_calibration_input(smollm, data_dir, tmp_path):
    tok = smollm.tokenizer
    real = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    txt = tmp_path / "calib.txt"
    txt.write_text(real)
    ids = calibration_ids(tok, CalibrationConfig(dataset=str(txt), n_samples=2, seq_len=16))
    assert ids.shape == (2, 16)
    rows = [{"text": p} for p in real.split("\n \n") if p.strip()][:40]
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert calibration_ids(tok, CalibrationConfig(dataset=str(jsonl), n_samples=2, seq_len=16)).shape == (2, 16)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"no_text": 1}\n')
    with pytest.raises(DataError, match="line 2"):
        calibration_ids(tok, CalibrationConfig(dataset=str(bad), n_samples=1, seq_len=2))
    with pytest.raises(DataError, match="neither a named source"):
        calibration_ids(tok, CalibrationConfig(dataset="no-such-corpus"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_ids(tok, CalibrationConfig(dataset=str(short), n_samples=1, seq_len=64))
    with pytest.raises(DataError, match="exceeds the model's maximum length"):
        calibration_ids(tok, CalibrationConfig(seq_len=9000), max_length=8192)
    with pytest.raises(DataError, match="n-samples"):
        CalibrationConfig(n_samples=0)
    with pytest.raises(DataError, match="seq-len"):
        CalibrationConfig(seq_len=True)
    with pytest.raises(DataError, match="tokenizer"):
        calibration_ids(None, CalibrationConfig())


def test_sampling_and_batching_helpers():
    ids = torch.arange(100)
    w = sample_windows(ids, 5, 10, seed=3)
    assert w.shape == (5, 10)
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in w)  # contiguous slices
    assert batch_bounds(8, 4) == [0, 1, 5, 8]
    assert batch_bounds(1, 4) == [0, 1]
    assert batch_bounds(3, 1) == [0, 1, 2, 3]


def test_activation_stats_match_direct_computation(smollm, windows):
    model = smollm.model
    request = {Q1: frozenset({"gram", "act_abs_mean"}), K1: frozenset({"gram"}), DOWN1: frozenset({"act_sq_mean"})}
    flags = [p.requires_grad for p in model.parameters()]
    stats = collect_stats(model, windows, request, batch_size=2)
    # the model is left as it was: no hooks, same requires_grad flags, no gradients
    assert all(not m._forward_hooks for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())

    x = _inputs_of(model, [Q1, DOWN1], windows)
    n_tokens = windows.numel()
    gram = x[Q1].T @ x[Q1]
    q, k, down = stats[Q1], stats[K1], stats[DOWN1]
    assert q.n_tokens == k.n_tokens == down.n_tokens == n_tokens == x[Q1].shape[0]
    assert q.gram.dtype == torch.float64 and q.gram.shape == (576, 576)
    assert torch.allclose(q.gram, gram, rtol=1e-5, atol=1e-5 * float(gram.abs().max()))
    assert k.gram is q.gram  # q and k read the same tensor: one accumulator, one Gram
    assert k.act_abs_mean is None  # k asked for the Gram only
    assert torch.allclose(q.act_abs_mean, x[Q1].abs().mean(0), rtol=1e-6)
    assert torch.allclose(down.act_sq_mean, x[DOWN1].square().mean(0), rtol=1e-5)
    assert down.gram is None and down.act_abs_mean is None and down.fisher is None


def test_fisher_matches_autograd(smollm, windows):
    model = copy.deepcopy(smollm.model)
    name = "model.layers.29.mlp.down_proj"
    ids = windows[:2, :16]
    flags = [p.requires_grad for p in model.parameters()]
    stats = collect_stats(model, ids, {name: frozenset({"fisher"})})[name]
    weight = model.get_submodule(name).weight
    assert [p.requires_grad for p in model.parameters()] == flags and weight.grad is None
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    expected = torch.zeros_like(weight)
    for row in ids:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None], use_cache=False).loss.backward()
        expected += weight.grad.square()
    assert stats.fisher.shape == (576, 1536)
    assert torch.allclose(stats.fisher, expected, rtol=1e-4, atol=1e-12)
    assert float(stats.fisher.sum()) > 0


def test_fisher_needs_a_causal_lm(minilm):
    ids = torch.randint(0, 1000, (1, 8))
    with pytest.raises(DataError, match="causal LM"):
        collect_stats(minilm.model, ids, {"encoder.layer.0.attention.self.query": frozenset({"fisher"})})


def test_bad_requests_are_one_line_errors(smollm, windows):
    with pytest.raises(DataError, match="unknown statistic"):
        collect_stats(smollm.model, windows, {Q1: frozenset({"hessian"})})
    with pytest.raises(DataError, match="no module"):
        collect_stats(smollm.model, windows, {"model.layers.99.mlp": frozenset({"gram"})})


def test_cache_reuses_stats_without_running_the_model(smollm, windows, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    model = smollm.model
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    request = {Q1: frozenset({"gram"}), K1: frozenset({"gram"})}
    try:
        first, run1 = cached_stats(model, windows, request, settings={"dataset": "wikitext2"})
        n_first = len(calls)
        second, run2 = cached_stats(model, windows, request, settings={"dataset": "wikitext2"})
    finally:
        handle.remove()
    assert not run1.cache_hit and n_first >= 1
    assert run2.cache_hit and len(calls) == n_first  # the second run did not run the model
    assert run1.key == run2.key and run2.n_tokens == windows.numel()
    assert torch.equal(first[Q1].gram, second[Q1].gram)
    assert second[K1].gram is second[Q1].gram  # shared tensors stored once, restored shared
    path = cache_path(run1.key)
    assert path.is_file() and path.parent.parent == tmp_path
    # the key follows the tokens and the request
    fp = model_fingerprint(model)
    assert stats_key(fp, windows, request) == run1.key
    assert stats_key(fp, windows[:, :16], request) != run1.key
    assert stats_key(fp, windows, {Q1: frozenset({"gram"})}) != run1.key
    # a damaged entry is ignored (recomputed), never trusted
    path.write_bytes(b"not a safetensors file")
    assert load_stats(path) is None


def test_fingerprint_follows_the_weights():
    tiny = torch.nn.Linear(4, 3)
    before = model_fingerprint(tiny)
    with torch.no_grad():
        tiny.weight[0, 0] += 1e-3
    assert model_fingerprint(tiny) != before


def _tiny_tokenizer(kind: str):
    """A real fast tokenizer (the ``tokenizers`` library) trained in memory on a few WikiText-like lines:
    ByteLevel BPE (GPT-2's pre-tokenizer), Metaspace (SentencePiece's), or Llama-2's tokenizer.json style
    (a ``Prepend("▁")`` normalizer, which marks the start of every call)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    lines = [" = Robert Boulter = \n", " \n", " Robert Boulter is an English film and television actor . \n",
             "He had a guest @-@ starring role on the television series The Bill in 2000 .\n"] * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind == "bytelevel" else []
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                       initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok), "".join(lines)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "prepend"])
def test_text_encoded_in_pieces_has_the_ids_of_one_call(kind, monkeypatch):
    """Pieces of 40 characters give exactly the ids of one call. GPT-2's and SentencePiece's pre-tokenizers
    are cut into many pieces; a tokenizer that marks the start of every call has no clean cut, so after
    MAX_TRIED_CUTS candidates the text is encoded in one call."""
    from rankwise.calibration import data

    tok, text = _tiny_tokenizer(kind)
    calls: list[int] = []
    cuts: list[int] = []
    encode, next_cut = data._ids, data._next_cut
    monkeypatch.setattr(data, "_ids", lambda t, piece: calls.append(len(piece)) or encode(t, piece))
    monkeypatch.setattr(data, "_next_cut", lambda *args: cuts.append(next_cut(*args)) or cuts[-1])
    got = data.encode_text(tok, text, piece_chars=40).tolist()
    assert got == tok(text, add_special_tokens=False)["input_ids"]
    if kind == "prepend":
        assert cuts == [len(text)] and len(calls) == 3 * data.MAX_TRIED_CUTS + 1 and calls[-1] == len(text)
    else:
        assert len(cuts) > 20 and len(text) not in calls
    assert data.encode_text(tok, "", piece_chars=40).numel() == 0


def test_pieces_never_cut_before_their_start():
    """Long whitespace runs and text without spaces: the ids stay those of one call and encoding ends."""
    from rankwise.calibration.data import encode_text

    tok, _ = _tiny_tokenizer("bytelevel")
    for text in ("Robert" + " " * 100 + "\nBoulter is an actor .\n" + " " * 90 + "\nThe Bill",
                 "x" * 130 + " y" + "\n" * 70):
        assert encode_text(tok, text, piece_chars=40).tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_real_sources_encoded_in_pieces_match_one_call(smollm, minilm, data_dir):
    """Both bundled tokenizers, both WikiText-2 sources: the piece-wise ids (64 KiB pieces) are the ids of
    one call on the whole text, so calibration windows and cached statistics are unchanged."""
    from rankwise.calibration import data

    cuts: list[int] = []
    next_cut = data._next_cut
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "_next_cut", lambda *args: cuts.append(next_cut(*args)) or cuts[-1])
        for tok in (smollm.tokenizer, minilm.tokenizer):
            for name in SOURCES:
                text = data.read_text(*data.source_path(name, str(data_dir)))
                whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
                cuts.clear()
                pieces = data.encode_text(tok, text)
                assert len(cuts) >= len(text) // data.PIECE_CHARS > 10 and len(text) not in cuts  # all in pieces
                assert pieces.numel() == len(whole) > 200_000
                assert pieces.tolist() == whole

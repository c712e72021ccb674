"""Applying plans: forms, break-even, rank specs, memory, data-aware methods on real data, CLI bad input."""

from __future__ import annotations

import copy
import json
import weakref

import pytest
import torch
from torch import nn

from helpers import run_cli
from helpers import tiny_llama as _tiny
from rankwise import decompose, merge
from rankwise.calibration import CalibrationConfig, cached_stats, calibration_ids
from rankwise.decomposition import get_method
from rankwise.decomposition.base import CalibrationStats
from rankwise.design.plan import Plan
from rankwise.design.ranks import energy_rank, factor_params
from rankwise.errors import DataError, DecompositionError, PlanError
from rankwise.layers.factorized import FactorizedLinear
from rankwise.models.adapters import adapter_for


def tiny_llama(vocab: int = 128, layers: int = 3, seed: int = 0) -> nn.Module:
    return _tiny(vocab=vocab, layers=layers, seed=seed)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tucker_keeps_the_papers_three_factor_form():
    model = tiny_llama()
    before = n_params(model)
    report = decompose(model, Plan.simple(layers=[0, 2], tensors="all", rank=2, method="tucker"), progress=False)
    assert len(report.targets) == 14 and not report.kept_dense
    expected_removed = 0
    for t in report.targets:
        m, n = t.shape
        assert t.form == "three_factor" and t.ranks == (2, 2)
        assert t.params_after == factor_params(2, m, n, "three_factor") == 2 * (m + n) + 4
        expected_removed += m * n - t.params_after
        layer = adapter_for(model).linear(t.layer, t.role)
        assert isinstance(layer, FactorizedLinear) and layer.core is not None
        assert 0 < t.rel_error < 1 and t.weighted_error is None and t.seconds >= 0
    assert report.params_before == before and report.params_after == n_params(model)
    assert report.params_removed == expected_removed
    assert report.bytes_before == 4 * before and report.bytes_after == 4 * n_params(model)
    assert report.reduction_pct == pytest.approx(100 * expected_removed / before)
    assert report.mean_rel_error == pytest.approx(sum(t.rel_error for t in report.targets) / 14)
    # the report spells out every method setting, defaults included
    assert report.fold == "auto" and report.plan["method"] == {"name": "tucker", "solver": "auto", "oversample": 2}
    assert all(t.method == "tucker" and t.method_settings == report.plan["method"] for t in report.targets)


def test_fold_true_gives_two_factors_with_the_same_error():
    plan = Plan.simple(layers=[1], tensors=["q", "down"], rank=3, method="tucker")
    three, two = tiny_llama(), tiny_llama()
    r3 = decompose(three, plan, progress=False)
    r2 = decompose(two, plan, fold=True, progress=False)
    for a, b in zip(r3.targets, r2.targets, strict=True):
        m, n = a.shape
        assert a.form == "three_factor" and b.form == "two_factor"
        assert b.params_after == 3 * (m + n) == a.params_after - 9
        assert b.rel_error == pytest.approx(a.rel_error, abs=1e-6)
    assert r2.fold == "true"
    svd = decompose(tiny_llama(), Plan.simple(layers=[1], tensors="q", rank=3, method="svd"), progress=False)
    assert svd.targets[0].form == "two_factor" and svd.targets[0].params_after == 3 * 128


def test_rank_above_break_even_is_kept_dense_unless_forced():
    # q is 64x64: Tucker break-even r* = 26 (26·128 + 26² = 4004 <= 4096 < 27·128 + 27²); two-factor r* = 32
    model = tiny_llama()
    report = decompose(model, Plan.simple(layers=[0], tensors="q", rank=27, method="tucker"), progress=False)
    t = report.targets[0]
    assert t.kept_dense and t.form == "dense" and "rank 27 above break-even r* = 26" in t.reason
    assert type(adapter_for(model).linear(0, "q")) is nn.Linear and report.params_removed == 0
    ok = decompose(model, Plan.simple(layers=[0], tensors="q", rank=26, method="tucker"), progress=False)
    assert not ok.targets[0].kept_dense and ok.targets[0].params_after == 4004
    forced = decompose(tiny_llama(), Plan.simple(layers=[0], tensors="q", rank=27, method="tucker", force=True),
                       progress=False)
    assert not forced.targets[0].kept_dense and forced.params_after > forced.params_before
    svd = decompose(tiny_llama(), Plan.simple(layers=[0], tensors="q", rank=33, method="svd"), progress=False)
    assert svd.targets[0].kept_dense and "r* = 32" in svd.targets[0].reason
    svd32 = decompose(tiny_llama(), Plan.simple(layers=[0], tensors="q", rank=32, method="svd"), progress=False)
    assert not svd32.targets[0].kept_dense  # 32·128 == 64·64: not more than dense


def test_energy_and_fraction_rank_specs():
    model = tiny_llama()
    w = adapter_for(model).linear(1, "up").weight.detach().clone()
    report = decompose(model, Plan.simple(layers=[1], tensors="up", rank="energy:0.6", method="svd"), progress=False)
    expected = energy_rank(get_method("svd").singular_values(w).tolist(), 0.6)
    assert report.targets[0].ranks == (expected, expected) and report.targets[0].rank_spec == "energy:0.6"
    frac = decompose(tiny_llama(), Plan.simple(layers=[1], tensors="up", rank=0.25, method="svd"), progress=False)
    t = frac.targets[0]
    assert t.params_after <= 0.25 * 128 * 64 < factor_params(t.ranks[0] + 1, 128, 64, "two_factor")


def test_bad_weights_and_plans_fail_before_any_change():
    model = tiny_llama()
    with torch.no_grad():
        adapter_for(model).linear(1, "v").weight[3, 5] = float("nan")
    with pytest.raises(DecompositionError, match="NaN"):
        decompose(model, Plan.simple(layers=[0, 1], tensors="all", rank=2), progress=False)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())  # layer 0 was not touched
    with pytest.raises(PlanError, match="out of range"):
        decompose(model, Plan.simple(layers=[3], rank=2), progress=False)
    with pytest.raises(PlanError, match="unknown method"):
        decompose(model, Plan.simple(layers=[0], method="pca"), progress=False)
    with pytest.raises(PlanError, match=r"outside 1\.\.min"):
        decompose(model, Plan.simple(layers=[0], tensors="k", rank=33), progress=False)
    with pytest.raises(PlanError, match="fold"):
        decompose(model, Plan.simple(layers=[0]), fold="sometimes", progress=False)
    fine = tiny_llama()
    decompose(fine, Plan.simple(layers=[0], tensors="q", rank=2), progress=False)
    with pytest.raises(PlanError, match="already factorized"):
        decompose(fine, Plan.simple(layers=[0], tensors="q", rank=2), progress=False)


def test_data_aware_methods_need_data_or_stats():
    model = tiny_llama()
    plan = Plan.simple(layers=[0], tensors="q", rank=4, method="svd-llm")
    with pytest.raises(DataError, match="tokenizer"):
        decompose(model, plan, progress=False)
    with pytest.raises(DataError, match="lack gram"):
        decompose(model, plan, {"model.layers.0.self_attn.q_proj": CalibrationStats()}, progress=False)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())


def test_loop_frees_each_dense_weight_before_the_next(monkeypatch):
    """At most one target's dense weight is alive beyond the not-yet-processed ones; none at the end."""
    model = tiny_llama()
    adapter = adapter_for(model)
    refs = [weakref.ref(adapter.linear(t.layer, t.role).weight) for t in adapter.targets() if t.layer < 2]
    alive: list[int] = []
    original = FactorizedLinear.from_factors.__func__

    def spy(cls, *args, **kwargs):
        alive.append(sum(r() is not None for r in refs))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(FactorizedLinear, "from_factors", classmethod(spy))
    decompose(model, Plan.simple(layers="0-1", tensors="all", rank=2, method="svd"), progress=False)
    assert alive == [len(refs) - i for i in range(len(refs))]
    assert all(r() is None for r in refs)


def test_merge_restores_plain_linears():
    model = tiny_llama()
    before = n_params(model)
    decompose(model, Plan.simple(layers=[2], tensors="all", rank=4), progress=False)
    factored = {name: m.dense_weight() for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        y = model(ids).logits
    merge(model)
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert n_params(model) == before
    for name, w in factored.items():
        assert torch.equal(model.get_submodule(name).weight, w)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, y, atol=1e-5)


def test_svd_llm_end_to_end_beats_svd_on_whitened_error(smollm, data_dir, tmp_path, monkeypatch):
    """Real model, real WikiText-2 windows (8 × 128 tokens): SVD-LLM's whitened error is lower than SVD's,
    its plain Frobenius error higher (SVD is Frobenius-optimal); the SVD run reuses the cached statistics."""
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    config = CalibrationConfig(n_samples=8, seq_len=128, seed=0)
    spec = {"layers": [1], "tensors": ["q", "gate", "up"], "rank": 32}
    model = copy.deepcopy(smollm.model)
    aware = decompose(model, {**spec, "method": "svd-llm"}, config, tokenizer=smollm.tokenizer, progress=False)
    assert aware.calibration["n_sequences"] == 8 and aware.calibration["seq_len"] == 128
    assert aware.calibration["dataset"] == "wikitext2" and not aware.calibration["cache_hit"]
    del model
    model = copy.deepcopy(smollm.model)
    ids = calibration_ids(smollm.tokenizer, config)
    request = {t.name: frozenset({"gram"}) for t in aware.targets}
    stats, run = cached_stats(model, ids, request, settings=config.describe())
    assert run.cache_hit  # same weights, tokens and request as the svd-llm run: no second pass
    plain = decompose(model, {**spec, "method": "svd"}, stats, progress=False)
    assert plain.calibration == {"source": "precomputed statistics"}
    for a, p in zip(aware.targets, plain.targets, strict=True):
        assert a.ranks == p.ranks == (32, 32)
        assert a.weighted_error is not None and p.weighted_error is not None
        assert a.weighted_error < p.weighted_error
        assert a.rel_error > p.rel_error
    assert aware.mean_weighted_error < plain.mean_weighted_error


# --- the CLI: bad input is one line, exit code 2, and OUT untouched ------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm):
    """A tiny random Llama saved with the real tokenizer, for fast CLI runs (one weight NaN in nan/)."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(vocab=len(smollm.tokenizer), layers=2)
    model.save_pretrained(root / "ok")
    smollm.tokenizer.save_pretrained(root / "ok")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(root / "nan")
    smollm.tokenizer.save_pretrained(root / "nan")
    return root


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "2"], "out of range 0..1"),
    (["--layers", "0", "--rank", "0"], "rank 0 is below 1"),
    (["--layers", "0", "--tensors", "k", "--rank", "33"], "outside 1..min(m, n) = 32"),
    (["--layers", "0", "--method", "pca"], "unknown method 'pca'"),
    (["--layers", "0", "--tensors", "qq"], "unknown tensor role 'qq'"),
    (["--plan", "PLAN_BAD_YAML"], "not valid YAML"),
    (["--plan", "PLAN_BAD_FIELD"], "unknown field 'ranks'"),
    (["--plan", "PLAN_MISSING"], "No such file"),
    (["--layers", "0", "--fold", "maybe"], "fold"),
    ([], "--plan FILE, or --layers"),
])
def test_cli_bad_input_is_one_line_exit_2_and_no_out(args, message, tiny_folder, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("layers: [0\nrank: 1\n")
    (tmp_path / "field.yaml").write_text("layers: [0]\nranks: 1\n")
    paths = {"PLAN_BAD_YAML": tmp_path / "bad.yaml", "PLAN_BAD_FIELD": tmp_path / "field.yaml",
             "PLAN_MISSING": tmp_path / "missing.yaml"}
    args = [str(paths.get(a, a)) for a in args]
    out = tmp_path / "out"
    code, _, err = run_cli(["decompose", str(tiny_folder / "ok"), *args, "-o", str(out), "-q"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_cli_nan_weight_and_existing_out(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["decompose", str(tiny_folder / "nan"), "--layers", "all", "-o", str(out), "-q"], capsys)
    assert code == 2 and "NaN/Inf" in err and err.count("\n") == 1 and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["decompose", str(tiny_folder / "ok"), "--layers", "0", "-o", str(out), "-q"], capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_cli_writes_checkpoint_report_and_json(tiny_folder, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "report.json"
    out.mkdir()
    (out / "decomposition_report.json").write_text("{}")  # a folder rankwise wrote (its report): replaceable
    (out / "stale.txt").write_text("old")
    code, stdout, _ = run_cli(["decompose", str(tiny_folder / "ok"), "--layers", "0,1", "--tensors", "attn",
                               "--rank", "4", "--method", "svd", "--fold", "true", "-o", str(out), "--overwrite",
                               "--json", str(js), "-q"], capsys)
    assert code in (0, None)
    assert not (out / "stale.txt").exists()  # --overwrite replaced the folder as a whole
    data = json.loads(js.read_text())
    on_disk = json.loads((out / "decomposition_report.json").read_text())
    assert data["summary"] == on_disk["summary"] and data["checkpoint"] == str(out)
    assert data["summary"]["targets_decomposed"] == 8 and data["fold"] == "true"
    assert data["calibration"] is None
    assert "targets decomposed" in stdout and "reduction of the whole model" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "rankwise"
    assert len(config["quantization_config"]["modules"]) == 8


def test_half_precision_model_keeps_its_dtype_through_a_checkpoint(tiny_folder, tmp_path):
    import rankwise

    loaded = rankwise.load(tiny_folder / "ok", dtype="bfloat16")
    report = decompose(loaded.model, Plan.simple(layers="all", tensors="mlp", rank=8, method="svd"), progress=False)
    assert report.dtype == "bfloat16" and report.bytes_after == 2 * report.params_after
    out = rankwise.save(loaded.model, tmp_path / "bf16", tokenizer=loaded.tokenizer)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = rankwise.load(out)  # no dtype given: the checkpoint's own
    assert again.info.dtype == "bfloat16"
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)

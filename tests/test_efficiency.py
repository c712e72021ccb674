"""Efficiency: accounting, FLOPs (vs hand counts and torch's FlopCounterMode), bytes, timing protocol,
energy counters (fake RAPL files, mocked NVML), execution-form choice, the never-slower guard, and the CLI.

No test asserts on a timing value: timings are only checked for shape (repeats, spreads, units)."""

from __future__ import annotations

import copy
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise
from helpers import run_cli
from helpers import tiny_llama as _tiny
from rankwise.design import Plan
from rankwise.efficiency import accounting, energy, execution, flops, ideal, microbench, timing
from rankwise.efficiency.compare import BenchConfig, compare
from rankwise.layers import FactorizedLinear, FactorizedShape
from rankwise.models.forward import cache_kwargs

SMOL_PARAMS = 134_515_008
SMOL_EMBED = 49152 * 576
SMOL_TARGETS = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)


# --- helpers ---------------------------------------------------------------------------------------------
def tiny_llama(tie: bool = True, seed: int = 0) -> nn.Module:
    return _tiny(max_positions=128, tie=tie, seed=seed)


@pytest.fixture
def one_thread():
    """Micro-benchmarks of tiny layers with 2 threads on a busy 2-core box spend their time in OMP barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def smol_decomposed(smollm):
    """The default model with the paper's rank-1 Tucker on layers {2, 29} and a 25% SVD override on layer 5."""
    model = copy.deepcopy(smollm.model)
    plan = Plan.from_dict({"layers": [2, 29], "tensors": "all", "rank": 1, "method": "tucker",
                           "overrides": [{"layers": [5], "tensors": "all", "rank": 0.25, "method": "svd"}]})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small SVDs with 2 threads on a busy 2-core box wait on OMP barriers
    try:
        report = rankwise.decompose(model, plan, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, report


# --- accounting ------------------------------------------------------------------------------------------
def test_accounting_default_model_counts_tied_head_once(smollm):
    size = accounting.model_size(smollm.model)
    assert size.params == SMOL_PARAMS == smollm.info.n_params
    assert size.nbytes == 4 * SMOL_PARAMS
    assert size.tied_embeddings and size.lm_head["shared_with_embeddings"]
    assert size.lm_head["params"] == SMOL_EMBED and not size.lm_head["counted_in_total"]
    assert size.embeddings["params"] == SMOL_EMBED
    assert "lm_head" not in size.by_role  # counted once, under the embedding
    assert sum(v["params"] for v in size.by_role.values()) == size.params
    assert sum(v["params"] for v in size.by_dtype.values()) == size.params
    assert size.target_params == size.target_dense_params == SMOL_TARGETS
    assert size.by_role["q"]["params"] == 30 * 576 * 576
    assert set(size.by_layer) == set(range(30))
    assert all(t.form == "dense" and t.ranks is None for t in size.targets)
    embed_row = next(r for r in size.rows if r.role == "embed")
    assert embed_row.tied and "lm_head.weight" in embed_row.aliases


def test_accounting_sees_factor_shapes(smol_decomposed):
    model, report = smol_decomposed
    size = accounting.model_size(model)
    assert size.params == report.params_after
    by_key = {(t.layer, t.role): t for t in size.targets}
    q2 = by_key[(2, "q")]
    assert q2.form == "three_factor" and q2.ranks == (1, 1)
    assert q2.params == 576 + 1 + 576 and q2.dense_params == 576 * 576
    gate5 = by_key[(5, "gate")]
    assert gate5.form == "two_factor"
    r = gate5.ranks[1]
    assert gate5.params == r * (576 + 1536) <= 0.25 * 576 * 1536
    assert by_key[(3, "q")].form == "dense"


def test_accounting_encoder_and_untied(minilm):
    size = accounting.model_size(minilm.model)
    assert size.params == minilm.info.n_params
    assert not size.tied_embeddings and size.lm_head["params"] == 0
    assert size.by_role["embed"]["params"] > 0 and "other" in size.by_role  # the pooler
    untied = accounting.model_size(tiny_llama(tie=False))
    assert not untied.tied_embeddings and untied.by_role["lm_head"]["params"] == 256 * 64


def test_disk_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.safetensors").write_bytes(b"y" * 10)
    assert accounting.disk_bytes(tmp_path) == {"total": 1012, "weights": 1010, "files": 3}
    with pytest.raises(rankwise.RankwiseError, match="not a folder"):
        accounting.disk_bytes(tmp_path / "config.json")


# --- FLOPs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["three_factor", "two_factor"])
def test_flops_hand_count_one_layer(form):
    m, n, r1, r2, tokens = 192, 576, 3, 5, 7
    shape = FactorizedShape(in_features=n, out_features=m, rank_out=r1 if form == "three_factor" else r2,
                            rank_in=r2, form=form, bias=True)
    layer = FactorizedLinear(shape)
    hand = 2 * tokens * (r2 * n + r1 * r2 + m * r1) if form == "three_factor" else 2 * tokens * (r2 * n + m * r2)
    assert flops.linear_flops(layer, tokens) == hand
    assert flops.linear_flops(nn.Linear(n, m), tokens) == 2 * tokens * m * n
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, tokens, n))
    assert counter.get_total_flops() == hand


def test_flops_hand_count_attention_and_head():
    model = tiny_llama()
    s = 10
    count = flops.prefill_flops(model, seq_len=s, batch=2, logits="all")
    per_layer_linear = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q,o + k,v (2 kv heads x 16) + mlp
    assert count.linear == 2 * 2 * s * 2 * per_layer_linear
    assert count.attention == 2 * 2 * 2 * 2 * s * s * 64  # layers x batch x (QK + AV) x 2 x S² x query width
    assert count.lm_head == 2 * 2 * s * 256 * 64
    last = flops.prefill_flops(model, seq_len=s, batch=2, logits="last")
    assert last.lm_head == 2 * 2 * 256 * 64
    step = flops.decode_flops(model, context_len=9, batch=3)
    assert step.attention == 2 * 3 * 2 * 2 * 10 * 64 and step.tokens == 3


@pytest.mark.parametrize("which", ["dense", "decomposed"])
def test_flops_match_flop_counter_on_default_model(smollm, smol_decomposed, which, one_thread):
    """Analytic count vs torch's FlopCounterMode (SDPA on CPU included via our mapping): within 2%."""
    model = smollm.model if which == "dense" else smol_decomposed[0]
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    counted = flops.counted_flops(model, ids)
    analytic = flops.prefill_flops(model, seq_len=32, batch=1, logits="all")
    assert abs(analytic.total - counted["total"]) <= 0.02 * counted["total"]
    assert counted["aten._scaled_dot_product_flash_attention_for_cpu"] == analytic.attention
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache))
    step = flops.counted_flops(model, ids[:, :1], **cache_kwargs(model, cache))
    analytic_step = flops.decode_flops(model, context_len=32, batch=1)
    assert abs(analytic_step.total - step["total"]) <= 0.02 * step["total"]
    if which == "decomposed":
        dense = flops.prefill_flops(smollm.model, seq_len=32).total
        assert analytic.total < dense


# --- bytes and the ideal -----------------------------------------------------------------------------------
def test_decode_bytes_hand_count():
    model = tiny_llama()
    b = ideal.decode_bytes(model, context_len=9, batch=2)
    assert b.lm_head == 256 * 64 * 4  # tied: the whole matrix is read by the head
    assert b.embedding_rows == 2 * 64 * 4
    assert b.kv_cache == 2 * 2 * 32 * 10 * 2 * 4  # layers x (K,V) x kv width x keys x batch x fp32
    linears = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    norms = 2 * 2 * 64 + 64
    assert b.weights == 4 * (linears + norms)


def test_ideal_includes_lm_head_and_realized_conventions(smollm, smol_decomposed):
    dense, model = smollm.model, smol_decomposed[0]
    step = ideal.decode_bytes(dense, context_len=128)
    assert step.lm_head == 4 * SMOL_EMBED
    idl = ideal.ideal_decode(dense, model, context_len=128)
    removed = 4 * (accounting.model_size(dense).params - accounting.model_size(model).params)
    assert idl.bytes_dense - idl.bytes_decomposed == removed
    assert idl.bound == "bytes" and 1.0 < idl.speedup < 1.2
    assert ideal.ideal_prefill(dense, model, 128).bound == "flops"
    r = ideal.realized(1.5, 2.0)
    assert r == {"realized": 0.75, "gain_realized": 0.5}
    assert ideal.realized(1.0, 1.005)["gain_realized"] is None
    assert ideal.realized(None, 2.0)["realized"] is None


# --- timing, memory ----------------------------------------------------------------------------------------
def test_stats():
    s = timing.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s.iqr_pct == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        timing.Stats.of([])


def test_measure_protocol_on_tiny_model(one_thread):
    models = {"a": tiny_llama(seed=0), "b": tiny_llama(seed=1)}
    workloads = [timing.Workload("prefill", 1, 16), timing.Workload("decode", 2, 8, new_tokens=3),
                 timing.Workload("scoring", 2, 16)]
    seen = []
    results = timing.measure(models, workloads, repeats=3, warmup=1,
                             progress=lambda done, total, label: seen.append((done, total)))
    assert len(results) == 6 and seen[-1][0] == seen[-1][1] == 3 * 2 * (1 + 3 + 1)
    for r in results:
        assert r.seconds.n == 3 and len(r.samples) == 3
        assert r.seconds.min <= r.seconds.median <= r.seconds.max
        assert r.memory is not None and r.memory.method in ("vmhwm", "sampled", "ru_maxrss")
        assert r.memory.peak_bytes > 0
        d = r.to_dict()
        assert d["metric"]["unit"] == r.workload.unit
    assert [w.unit for w in workloads] == ["tokens/s", "ms/token", "ms/batch"]
    with pytest.raises(rankwise.RankwiseError):
        timing.measure(models, workloads, repeats=0)


def test_decode_workload_equals_full_forward():
    """The decode runner feeds a real KV cache: the cached step gives the same logits as a full pass."""
    model = tiny_llama()
    from transformers import DynamicCache

    ids = torch.randint(0, 256, (2, 9))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids[:, :8], **cache_kwargs(model, cache))
        step = model(ids[:, 8:9], **cache_kwargs(model, copy.deepcopy(cache))).logits[:, -1]
        full = model(ids).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_peak_memory_sees_an_allocation():
    from rankwise.efficiency.memory import PeakMemory

    with PeakMemory("cpu") as pm:
        x = torch.ones(64, 1 << 20)  # 256 MiB, touched
        del x
    assert pm.result.increase_bytes >= 200 << 20
    assert pm.result.to_dict()["device"] == "cpu"


def test_peak_memory_falls_back_to_sampling_where_the_kernel_mark_does_not_follow(monkeypatch):
    """On a kernel whose VmHWM ignores memory mapped and unmapped after a reset, the sampler measures."""
    from rankwise.efficiency import memory

    monkeypatch.setattr(memory, "_hwm_follows_allocations", lambda: False)
    with memory.PeakMemory("cpu") as pm:
        x = torch.ones(64, 1 << 20)  # 256 MiB, touched
        time.sleep(0.05)
        del x
    assert pm.result.method == "sampled"
    assert pm.result.increase_bytes >= 200 << 20


def test_peak_memory_is_not_hidden_by_garbage_freed_during_the_work():
    """A dropped model still in a reference cycle is freed whenever the cyclic collector runs; if that is in
    the middle of the measured work, RSS falls below the baseline and the work's own peak disappears."""
    import gc

    from rankwise.efficiency.memory import PeakMemory

    class Holder:
        pass

    garbage = Holder()
    garbage.tensor, garbage.cycle = torch.ones(128, 1 << 20), garbage  # 512 MiB, freed only by the collector
    del garbage
    with PeakMemory("cpu") as pm:
        gc.collect()  # the collector may run at any allocation
        x = torch.ones(64, 1 << 20)  # 256 MiB, touched
        del x
    assert pm.result.increase_bytes >= 200 << 20


# --- energy --------------------------------------------------------------------------------------------------
def _zone(path: Path, name: str, uj: int, max_uj: int) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def test_rapl_counter_with_fake_files_and_wraparound(tmp_path):
    pkg = _zone(tmp_path / "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000)
    _zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:0", "core", 5, 1_000_000_000)  # inside the package: skipped
    dram = _zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:1", "dram", 100, 2_000_000)
    zones = energy.rapl_zones(tmp_path)
    assert [z.name for z in zones] == ["package-0", "dram"]
    counter, label = energy.find_counter("cpu", rapl_root=tmp_path)
    assert counter is not None and label == "rapl:package-0+dram"
    start = counter.read()
    (pkg / "energy_uj").write_text("500000\n")  # wrapped: 1_000_000 uJ to the top + 500_000 after
    (dram / "energy_uj").write_text("1100\n")
    assert counter.joules(start, counter.read()) == pytest.approx(1.5 + 0.001)


def test_rapl_absent_or_unreadable(tmp_path):
    counter, reason = energy.find_counter("cpu", rapl_root=tmp_path / "nothing")
    assert counter is None and "no RAPL zones" in reason
    bad = _zone(tmp_path / "intel-rapl:0", "package-0", 1, 10)
    (bad / "energy_uj").write_text("not a number")
    counter, reason = energy.find_counter("cpu", rapl_root=tmp_path)
    assert counter is None and "unreadable" in reason


def test_nvml_counter_mocked_at_its_boundary(monkeypatch):
    readings = iter([9_000, 10_000, 12_500])  # the first read checks the counter works
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    counter, label = energy._nvml_counter(0)
    assert label == "nvml:gpu0"
    assert counter.joules(counter.read(), counter.read()) == pytest.approx(2.5)  # mJ -> J
    monkeypatch.setitem(sys.modules, "pynvml", None)
    counter, reason = energy._nvml_counter(0)
    assert counter is None and "pynvml is not installed" in reason


def test_compare_energy_null_with_reason_and_numbers_with_counter(tmp_path, monkeypatch, one_thread):
    models = {"dense": tiny_llama(seed=0), "other": tiny_llama(seed=1)}
    config = BenchConfig(seq_lens=(8,), batch_sizes=(1,), context=4, decode_tokens=2, scoring=None, repeats=2,
                         memory=False, control=True)
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "no-powercap")
    result = compare(models, "dense", config)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["energy"] is None and "no RAPL zones" in data["energy_reason"]
    assert {r["model"] for r in data["rows"]} == {"dense", "dense (A/A control)", "other"}
    assert all(r["energy"] is None for r in data["rows"])
    other = next(r for r in data["rows"] if r["model"] == "other" and r["workload"]["kind"] == "decode")
    assert other["ideal"]["bound"] == "bytes" and other["realized"] is not None
    assert other["paired_speedup"] > 0
    from rankwise.efficiency.compare import paired_speedup

    # one slow spell hitting the model's second run: ratio of medians 1.0/1.5, per-pair ratios 2, 0.5, 2
    assert paired_speedup([1.0, 1.0, 3.0], [0.5, 2.0, 1.5]) == 2.0 and paired_speedup([], []) is None
    _zone(tmp_path / "rapl" / "intel-rapl:0", "package-0", 1000, 10**9)
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "rapl")
    data = compare(models, "dense", config).to_dict()
    assert data["energy_reason"] is None and data["energy"]
    tally = next(iter(data["energy"].values()))
    assert tally["runs"] == 2 and tally["joules"] == 0.0 and tally["counter"] == "rapl:package-0"


# --- execution forms ---------------------------------------------------------------------------------------
def test_choose_execution_picks_and_records_every_target(cache_tmp, one_thread):
    model = tiny_llama()
    rankwise.decompose(model, Plan.simple(layers="all", tensors="all", rank=4, method="tucker"), progress=False)
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
    report = execution.choose_execution(model, token_counts=(1, 8), blocks=3)
    assert len(report.targets) == 14 and sum(report.counts().values()) == 14
    assert report.counts()["not_factorized"] == 0
    from rankwise.models import adapter_for

    adapter = adapter_for(model)
    for t in report.targets:
        assert t.original_form == "three_factor" and t.form in execution.FORMS
        assert set(t.timings_us) == {1, 8}
        assert set(t.timings_us[1]) == {"three_factor", "two_factor", "dense"}
        assert all(v > 0 for v in t.timings_us[8].values())
        assert t.reason.startswith(t.form)
        module = adapter.linear(t.layer, t.role)
        if t.form == "dense":
            assert type(module) is nn.Linear and t.layouts is None
        else:
            assert isinstance(module, FactorizedLinear) and module.shape.form == t.form
            assert t.layouts == module.layouts and set(t.layouts) == set(module.factors())
    with torch.inference_mode():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # execution form never changes the function
    cache_file = Path(report.cache_file)
    assert cache_file.is_file() and cache_file.parent == cache_tmp / "execution"
    assert "-float32-t1" in cache_file.name
    entries = json.loads(cache_file.read_text())["entries"]
    forms = [k for k in entries if not k.startswith("matrix:")]
    assert len(forms) == 4 * 2 * 3  # 4 distinct shapes x 2 token counts x 3 forms
    matrices = {k.split(":")[1] for k in entries if k.startswith("matrix:")}
    # each factor matrix of each shape's three- and two-factor forms, timed in both layouts at both counts
    assert len(entries) - len(forms) == len(matrices) * 2 * 2
    json.dumps(report.to_dict())


def test_execution_cache_is_reused(cache_tmp, one_thread, monkeypatch):
    shape = FactorizedShape(64, 32, 4, 4, "three_factor", False)
    dev = torch.device("cpu")
    cache = execution.TimingCache.for_device(dev, torch.float32, 1)
    first = execution.benchmark_shape(shape, (1,), dev, torch.float32, cache, blocks=2)
    cache.save()

    def boom(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(microbench, "time_forms", boom)
    again = execution.benchmark_shape(shape, (1,), dev, torch.float32,
                                      execution.TimingCache.for_device(dev, torch.float32, 1))
    assert again == first


def test_relayout_keeps_values_state_and_picks_col_only_when_faster_everywhere():
    layer = FactorizedLinear.from_factors(torch.randn(64, 8), None, torch.randn(32, 8))
    x = torch.randn(3, 32)
    before = layer(x)
    layer.set_layouts({"first": "col", "last": "col"})
    assert layer.layouts == {"first": "col", "last": "col"} and not layer.last.weight.is_contiguous()
    assert layer.last.weight.shape == (64, 8)
    torch.testing.assert_close(layer(x), before)
    state = layer.state_dict()
    assert all(v.is_contiguous() for v in state.values())  # safetensors refuses strided tensors
    layer.set_layouts({"first": "row", "last": "row"})
    assert layer.layouts == {"first": "row", "last": "row"} and layer.last.weight.is_contiguous()
    T = execution.FormTiming
    assert execution.choose_layout({1: {"row": T(100, 100, 3), "col": T(50, 50, 3)},
                                    8: {"row": T(200, 200, 3), "col": T(150, 150, 3)}}) == "col"
    assert execution.choose_layout({1: {"row": T(100, 100, 3), "col": T(50, 50, 3)},
                                    8: {"row": T(200, 200, 3), "col": T(210, 210, 3)}}) == "row"  # 5% slower
    assert execution.choose_layout({1: {"row": T(100, 100, 3), "col": T(50, 50, 3)},
                                    512: {"row": T(200, 220, 3), "col": T(210, 210, 3)}}) == "col"  # in noise
    assert execution.choose_layout({1: {"row": T(100, 100, 3), "col": T(99, 99, 3)}}) == "row"  # within margin


def test_column_layouts_save_and_reload_as_ordinary_checkpoints(smollm, tmp_path):
    model = tiny_llama()
    rankwise.decompose(model, Plan.simple(layers="all", tensors="all", rank=4, method="svd"), progress=False)
    for module in model.modules():
        if isinstance(module, FactorizedLinear):
            module.set_layouts({"first": "col", "last": "col"})
    ids = torch.randint(0, 256, (1, 10))
    with torch.inference_mode():
        before = model(ids).logits
    rankwise.save(model, tmp_path / "out", tokenizer=smollm.tokenizer)
    loaded = rankwise.load(tmp_path / "out").model
    with torch.inference_mode():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    layouts = [m.layouts for m in loaded.modules() if isinstance(m, FactorizedLinear)]
    assert len(layouts) == 14 and all(v == "row" for lay in layouts for v in lay.values())  # files are row-major


def test_choose_form_rule():
    T = execution.FormTiming
    fast = {1: {"two_factor": T(50, 52, 3), "dense": T(100, 101, 3)},
            512: {"two_factor": T(400, 410, 3), "dense": T(900, 905, 3)}}
    assert execution.choose_form(fast)[0] == "two_factor"
    loses_at_prefill = {1: {"two_factor": T(50, 51, 3), "dense": T(100, 101, 3)},
                        512: {"two_factor": T(1200, 1210, 3), "dense": T(900, 905, 3)}}
    assert execution.choose_form(loses_at_prefill)[0] == "dense"
    within_noise = {1: {"two_factor": T(104, 130, 3), "dense": T(100, 125, 3)}}  # 4% slower, 25% noise
    assert execution.choose_form(within_noise)[0] == "two_factor"
    tie = {1: {"three_factor": T(50, 51, 3), "two_factor": T(50.5, 51, 3), "dense": T(100, 101, 3)}}
    shape = FactorizedShape(576, 576, 1, 1, "three_factor", False)
    params = execution.form_params(shape)
    assert params == {"three_factor": 1153, "two_factor": 1152, "dense": 576 * 576}
    assert execution.choose_form(tie, params=params)[0] == "two_factor"  # as fast, fewer bytes


def test_guard_merges_until_not_slower(cache_tmp, monkeypatch):
    """The guard's logic with both timers replaced at their boundary: micro-benchmarks say two-factor is
    (out_features / 10)x faster than dense, and the decomposed model "runs" at 1.5x dense time while more
    than 4 targets are factorized. The guard must merge least useful first, half per round, and stop."""
    model = tiny_llama()
    rankwise.decompose(model, Plan.simple(layers="all", tensors="all", rank=2, method="svd"), progress=False)
    T = execution.FormTiming

    def fake_bench(shape, token_counts, *a, **k):
        return {t: {"two_factor": T(10.0, 10.0, 3), "dense": T(float(shape.out_features), shape.out_features, 3)}
                for t in token_counts}

    monkeypatch.setattr(execution, "benchmark_shape", fake_bench)
    from rankwise.models import adapter_for

    adapter = adapter_for(model)

    def fake_measure(models, workloads, **kw):
        factorized = sum(isinstance(adapter.linear(t.layer, t.role), FactorizedLinear) for t in adapter.targets())
        slow = 1.5 if factorized > 4 else 1.0
        one = timing.Stats(median=1.0, q1=1.0, q3=1.0, min=1.0, max=1.0, n=3)
        dec = timing.Stats(median=slow, q1=slow, q3=slow, min=slow, max=slow, n=3)
        return [timing.WorkloadResult(model=name, workload=w, seconds=one, metric=dec if name == "decomposed" else one)
                for w in workloads for name in models]

    monkeypatch.setattr(timing, "measure", fake_measure)
    report = execution.choose_execution(model, token_counts=(1,), guard=True, guard_repeats=3)
    assert [g.factorized_targets for g in report.guard] == [14, 7, 3]
    assert [len(g.merged_after) for g in report.guard] == [7, 4, 0]
    assert [g.ratio for g in report.guard] == [1.5, 1.5, 1.0] and report.not_slower is True
    by_name = {c.name: c for c in report.targets}
    first = [by_name[n].role for n in report.guard[0].merged_after]
    assert sorted(first[:4]) == ["k", "k", "v", "v"]  # 3.2x: the least useful went first
    assert sorted(c.role for c in report.targets if c.form == "two_factor") == ["gate", "gate", "up"] or \
        sorted(c.role for c in report.targets if c.form == "two_factor") == ["gate", "up", "up"]
    assert report.counts() == {"three_factor": 0, "two_factor": 3, "merged": 11, "not_factorized": 0}
    for g in report.guard:
        for name in g.merged_after:
            assert by_name[name].reason.startswith("merged by the end-to-end guard")
            assert type(adapter.linear(by_name[name].layer, by_name[name].role)) is nn.Linear


def test_rank_above_break_even_stays_dense_and_says_so(smollm, cache_tmp, one_thread):
    """Rank 400 on a 576x576 q: 400·1152 > 576² params, so the decomposition keeps it dense; the execution
    report carries the reason, and the guard compares against the real dense model."""
    model = copy.deepcopy(smollm.model)
    plan = Plan.from_dict({"layers": [3], "tensors": ["q"], "rank": 400, "method": "svd",
                           "overrides": [{"layers": [4], "tensors": ["k"], "rank": 8, "method": "svd"}]})
    dec = rankwise.decompose(model, plan, progress=False)
    assert [t.kept_dense for t in dec.targets] == [True, False]
    layer3 = model.model.layers[3].self_attn.q_proj
    assert type(layer3) is nn.Linear
    report = execution.choose_execution(model, token_counts=(1,), blocks=2, guard=True, reference=smollm.model,
                                        guard_context=8, guard_tokens=2, guard_repeats=2)
    q3 = next(t for t in report.targets if (t.layer, t.role) == (3, "q"))
    assert q3.form == "dense" and "break-even" in q3.reason
    k4 = next(t for t in report.targets if (t.layer, t.role) == (4, "k"))
    assert k4.original_form == "two_factor" and set(k4.timings_us[1]) == {"two_factor", "dense"}
    assert len(report.guard) >= 1 and report.guard[0].per_batch[1]["dense"] > 0
    assert type(model.model.layers[3].self_attn.q_proj) is nn.Linear


def test_choose_execution_rejects_other_dtype():
    model = tiny_llama()
    with pytest.raises(rankwise.RankwiseError, match="convert it first"):
        execution.choose_execution(model, dtype="bfloat16")


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_bench_checkpoint_against_recorded_source(smollm, tmp_path, one_thread):
    from typer.testing import CliRunner

    from rankwise.cli.main import app

    model = copy.deepcopy(smollm.model)
    report = rankwise.decompose(model, Plan.simple(layers=[2], tensors=["q", "k"], rank=1), progress=False,
                                name="smollm2-135m")
    ckpt = rankwise.save(model, tmp_path / "ckpt", tokenizer=smollm.tokenizer, report=report)
    del model
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", str(ckpt), "--seq-lens", "16", "--batch-sizes", "1", "--decode-tokens", "2", "--context", "8",
        "--scoring", "none", "--repeats", "1", "--warmup", "0", "--execution", "as-is", "--threads", "1",
        "--json", str(out), "--quiet"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "size and arithmetic" in result.output and "decode b=1 ctx=8" in result.output
    data = json.loads(out.read_text())
    assert data["baseline"] == "smollm2-135m"
    sizes = {name: m["size"]["params"] for name, m in data["models"].items()}
    assert sizes["smollm2-135m"] == SMOL_PARAMS and sizes["ckpt"] == report.params_after
    assert data["disk_bytes"]["weights"] > 0
    if data["energy"] is None:
        assert data["energy_reason"] and "energy: not measurable on this machine" in result.output


def test_cli_bench_plan_on_an_encoder(tmp_path, cache_tmp, one_thread):
    """``--plan`` decomposes in memory; an encoder gets prefill and scoring but no decode workloads."""
    from typer.testing import CliRunner

    from rankwise.cli.main import app

    plan = tmp_path / "plan.yaml"
    Plan.simple(layers=[0], tensors=["q"], rank=8, method="svd").save(plan)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "minilm-l6", "--plan", str(plan), "--seq-lens", "16", "--scoring", "2x16", "--repeats", "2",
        "--warmup", "0", "--threads", "1", "--json", str(out), "--quiet"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["baseline"] == "minilm-l6"
    assert {r["workload"]["kind"] for r in data["rows"]} == {"prefill", "scoring"}
    q0 = next(t for t in data["execution"]["targets"] if (t["layer"], t["role"]) == (0, "q"))
    assert q0["original_form"] == "two_factor" and q0["form"] in ("two_factor", "dense")
    assert data["execution"]["counts"]["not_factorized"] == 35 and data["execution"]["guard"] == []
    assert data["decomposition"]["targets_decomposed"] == 1


@pytest.mark.parametrize("args, message", [
    (["--seq-lens", "12x"], "--seq-lens"),
    (["--scoring", "8by256"], "--scoring"),
    (["--execution", "fast"], "--execution"),
])
def test_cli_bench_bad_options_are_one_line_errors(args, message, capsys):
    code, _, err = run_cli(["bench", "smollm2-135m", "--baseline", "smollm2-135m", *args], capsys)
    err = err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_cli_bench_needs_a_baseline_for_a_plain_model(capsys):
    code, _, err = run_cli(["bench", "smollm2-135m"], capsys)
    assert code == 2 and "not a rankwise checkpoint" in err

"""Rank allocation: budgets in explicit units, allocators that never exceed them, an optimal knapsack,
sensitivity profiles, error compensation and layer removal."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from helpers import run_cli, tiny_llama
from rankwise.allocation.allocators import Problem, available_allocators, choice_table, get_allocator
from rankwise.allocation.budget import Budget, TargetSize, accounting_for, parse_bytes
from rankwise.design.ranks import fraction_rank
from rankwise.errors import PlanError

# --- a small synthetic instance -----------------------------------------------------------------------------
SHAPES = [(12, 8), (8, 8), (16, 6), (10, 10)]


def synthetic_targets(form: str = "two_factor") -> list[TargetSize]:
    return [TargetSize(i, "w", m, n, form) for i, (m, n) in enumerate(SHAPES)]


def synthetic_predict(key, rank):
    """Convex-ish decreasing loss per target, with different sensitivities per target."""
    if rank is None:
        return 0.0
    layer = key[0]
    weight = [5.0, 1.0, 3.0, 0.5][layer]
    return weight * math.exp(-0.6 * rank) + 0.01 * layer


def synthetic_spectra(targets):
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in targets:
        s = torch.sort(torch.rand(min(t.m, t.n), generator=gen) ** (1 + t.layer), descending=True).values
        out[t.key] = s.tolist()
    return out


def problem(cap: int, **kw) -> Problem:
    targets = synthetic_targets(kw.pop("form", "two_factor"))
    return Problem(targets=targets, cap=cap, spectra=synthetic_spectra(targets), predict=synthetic_predict,
                   grid=kw.pop("grid", 8), max_units=kw.pop("max_units", 10**6), **kw)


def test_registry_lists_every_allocator():
    assert {"uniform", "energy", "greedy", "knapsack", "target"} <= set(available_allocators())
    with pytest.raises(PlanError, match="unknown allocator"):
        get_allocator("nope")


@pytest.mark.parametrize("name", ["uniform", "energy", "greedy", "knapsack"])
@pytest.mark.parametrize("form", ["two_factor", "three_factor"])
def test_every_allocator_meets_its_cap(name, form):
    targets = synthetic_targets(form)
    low = sum(t.params(1) for t in targets)
    dense = sum(t.dense for t in targets)
    for cap in range(low, dense + 1, 7):
        alloc = get_allocator(name).allocate(problem(cap, form=form))
        assert alloc.cost <= cap, (name, cap, alloc.cost)
        assert alloc.cost == sum(t.params(alloc.choices[t.key]) for t in targets)
        for t in targets:
            r = alloc.choices[t.key]
            assert r is None or 1 <= r <= t.max_rank  # factorized only below break-even


def test_cap_below_smallest_plan_is_a_one_line_error():
    low = sum(t.params(1) for t in synthetic_targets())
    for name in ("uniform", "knapsack"):
        with pytest.raises(PlanError, match="below the smallest plan"):
            get_allocator(name).allocate(problem(low - 1))


def test_uniform_keeps_one_fraction_and_uses_the_budget():
    targets = synthetic_targets()
    cap = int(0.6 * sum(t.dense for t in targets))
    alloc = get_allocator("uniform").allocate(problem(cap))
    f = alloc.details["fraction"]
    for t in targets:  # every target at the largest rank within f of its parameters
        assert t.params(alloc.choices[t.key]) <= f * t.dense + 1e-9
    # f is maximal: a slightly larger fraction would go over the cap
    bigger = {t.key: max(1, min(t.max_rank, fraction_rank(f + 0.02, t.m, t.n, t.form))) for t in targets}
    assert sum(t.params(bigger[t.key]) for t in targets) > cap or f > 0.97


def brute_force(p: Problem) -> tuple[float, int]:
    """Least summed loss (and its cost) over every combination of the allocator's options."""
    table = choice_table(p)
    best = (math.inf, 0)
    for combo in itertools.product(*table):
        cost = sum(o[1] for o in combo)
        if cost <= p.cap:
            loss = sum(o[2] for o in combo)
            if loss < best[0] - 1e-12:
                best = (loss, cost)
    return best


@pytest.mark.parametrize("fraction", [0.25, 0.45, 0.7, 0.9])
def test_knapsack_is_optimal_against_brute_force(fraction):
    dense = sum(t.dense for t in synthetic_targets())
    p = problem(int(fraction * dense))
    alloc = get_allocator("knapsack").allocate(p)
    assert alloc.details["cost_unit_params"] == 1  # exact DP at this size
    best, _ = brute_force(p)
    assert alloc.predicted_loss == pytest.approx(best, abs=1e-9)
    assert sum(synthetic_predict(k, r) for k, r in alloc.choices.items()) == pytest.approx(best, abs=1e-9)
    greedy = get_allocator("greedy").allocate(p)
    assert greedy.predicted_loss >= best - 1e-9  # greedy can only match the optimum


def test_knapsack_with_coarse_units_never_exceeds_the_cap():
    dense = sum(t.dense for t in synthetic_targets())
    for frac in (0.3, 0.55, 0.8):
        cap = int(frac * dense)
        alloc = get_allocator("knapsack").allocate(problem(cap, max_units=40))
        assert alloc.details["cost_unit_params"] > 1
        assert alloc.cost <= cap


def test_target_mode_finds_the_smallest_plan_under_the_loss():
    dense = sum(t.dense for t in synthetic_targets())
    for max_loss in (0.05, 0.5, 2.0):
        p = problem(dense, max_loss=max_loss)
        alloc = get_allocator("target").allocate(p)
        assert alloc.predicted_loss <= max_loss
        table = choice_table(p)
        cheapest = min(sum(o[1] for o in combo) for combo in itertools.product(*table)
                       if sum(o[2] for o in combo) <= max_loss)
        assert alloc.cost == cheapest
    with pytest.raises(PlanError, match="no plan within the budget"):
        get_allocator("target").allocate(problem(sum(t.params(1) for t in synthetic_targets()), max_loss=1e-9))


def test_energy_allocator_follows_the_spectrum():
    p = problem(int(0.5 * sum(t.dense for t in synthetic_targets())))
    alloc = get_allocator("energy").allocate(p)
    tau = alloc.details["energy_threshold"]
    assert 0.0 < tau < 1.0
    from rankwise.design.ranks import energy_rank

    for t in p.targets:
        assert alloc.choices[t.key] == max(1, min(t.max_rank, energy_rank(p.spectra[t.key], tau)))


def test_allocators_that_need_a_profile_say_so():
    p = problem(500)
    p.predict = None
    with pytest.raises(PlanError, match="needs predict"):
        get_allocator("knapsack").allocate(p)


# --- budget units ---------------------------------------------------------------------------------------------
def test_budget_parsing_and_units():
    assert Budget.parse(0.8, "decoder-params") == Budget(0.8, "decoder-params")
    assert Budget.parse("250MB", "bytes").value == 250_000_000
    assert parse_bytes("1.5KiB") == 1536
    for bad, unit in ((0, "model-params"), (1.5, "decoder-params"), ("x", "model-params"), ("12 parsecs", "bytes")):
        with pytest.raises(PlanError):
            Budget.parse(bad, unit)
    with pytest.raises(PlanError, match="not a budget unit"):
        Budget.parse(0.5, "flops")
    assert "decoder linear" in Budget(0.8, "decoder-params").describe()


def test_accounting_caps_meet_every_unit_on_a_real_module_tree():
    model = tiny_llama(layers=3)
    acc = accounting_for(model)
    assert acc.model_params == sum(p.numel() for p in model.parameters())
    assert acc.decoder_params == sum(t.dense for t in acc.targets) == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    for budget in (Budget(0.7, "decoder-params"), Budget(0.8, "model-params"),
                   Budget(0.9 * acc.model_params * 4, "bytes")):
        cap = acc.check(budget)
        for name in ("uniform", "knapsack"):
            p = Problem(acc.targets, cap, predict=lambda k, r: 0.0 if r is None else 1.0 / r, max_units=5000)
            alloc = get_allocator(name).allocate(p)
            assert acc.measure(alloc.cost)[budget.unit] <= budget.value
    with pytest.raises(PlanError, match="below the smallest possible plan"):
        acc.check(Budget(0.001, "decoder-params"))


def test_removal_accounting_counts_whole_blocks():
    from rankwise.allocation.planner import removal_layers

    model = tiny_llama(layers=4)
    acc = accounting_for(model)
    influence = [0.4, 0.1, 0.3, 0.2]
    removed = removal_layers(acc, Budget(0.75, "decoder-params"), influence)
    assert removed == (1,)  # one of four identical blocks: exactly 75% of the decoder linears
    removed = removal_layers(acc, Budget(0.7, "decoder-params"), influence)
    assert removed == (1, 3)
    m = acc.measure(sum(t.dense for t in acc.targets if t.layer not in removed), removed)
    assert m["params"] == acc.model_params - acc.block_params[1] - acc.block_params[3]


# --- layer removal and compensation in the decomposition loop ---------------------------------------------------
def test_remove_layers_plan_drops_blocks_and_counts_parameters(tmp_path):
    from rankwise.decomposition.apply import decompose_ as decompose

    model = tiny_llama(layers=4)
    block_params = sum(p.numel() for p in model.model.layers[2].parameters())
    before = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 256, (2, 12))
    report = decompose(model, {"method": "svd", "rank": 4, "layers": [0], "remove_layers": [2]}, progress=False)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.params_after == before - block_params - sum(t.params_before - t.params_after
                                                              for t in report.targets)
    with torch.no_grad():
        model(input_ids=ids)
        out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)  # KV cache sized for 3 layers
    assert out.shape[1] == 15
    from transformers import LlamaForCausalLM

    plain = tiny_llama(layers=4)
    from rankwise.decomposition.removal import remove_blocks

    remove_blocks(plain, [2])
    plain.save_pretrained(tmp_path / "removed")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "removed").eval()
    assert back.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_decomposed_and_removed_model_saves_and_loads_bit_identically(tmp_path):
    import rankwise
    from rankwise.decomposition.apply import decompose_ as decompose

    model = tiny_llama(layers=4)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    decompose(model, {"method": "svd", "rank": 4, "layers": [0, 3], "remove_layers": [2], "compensate": True},
              calibration=ids, progress=False)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rankwise.save(model, tmp_path / "ckpt")
    back, _, _ = rankwise.load(str(tmp_path / "ckpt"))
    assert back.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)


def _output_error(model, ref_model, ids):
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = ref_model(input_ids=ids).logits
    return float((a - b).pow(2).mean())


def test_compensation_refit_reduces_output_error_and_leaves_svd_llm_alone():
    from rankwise.decomposition.base import CalibrationStats
    from rankwise.decomposition.compensation import refit_output_factor
    from rankwise.decomposition.svd import SVD
    from rankwise.decomposition.svd_llm import SVDLLM
    from rankwise.layers.factorized import FactorizedLinear

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=gen)
    X = torch.randn(200, 16, generator=gen) @ torch.diag(torch.linspace(0.1, 3.0, 16))
    G = (X.T @ X).double()
    for method, changes in ((SVD(), True), (SVDLLM(), False)):
        f = method.decompose(W, 5, CalibrationStats(gram=G)).factors
        layer = FactorizedLinear.from_factors(f.A, f.G, f.B)
        with torch.no_grad():
            before = float((X @ W.T - layer(X)).pow(2).sum())
        refit_output_factor(layer, W, G, G)
        with torch.no_grad():
            after = float((X @ W.T - layer(X)).pow(2).sum())
        if changes:
            assert after < 0.9 * before
        else:
            assert after == pytest.approx(before, rel=1e-4)


@pytest.mark.parametrize("mode", [True, "sequential"])
def test_compensated_plans_run_and_do_not_hurt(mode):
    from rankwise.decomposition.apply import decompose_ as decompose

    ref = tiny_llama(layers=2, seed=3)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    errors = {}
    for comp in (False, mode):
        model = copy.deepcopy(ref)
        plan = {"method": "svd", "rank": 8, "compensate": comp}
        report = decompose(model, plan, calibration=ids, progress=False)
        assert len(report.targets) == 14 and all(t.form == "two_factor" for t in report.targets)
        errors[comp] = _output_error(model, ref, ids)
    assert errors[mode] < errors[False]


def test_plan_fields_round_trip_and_validate():
    from rankwise.design.plan import Plan

    p = Plan.from_dict({"method": "svd-llm", "rank": 0.5, "compensate": "sequential", "remove_layers": "3,5-6"})
    assert p.remove_layers == (3, 5, 6) and Plan.from_dict(p.to_dict()) == p
    with pytest.raises(PlanError, match="compensate"):
        Plan.from_dict({"compensate": "always"})


# --- sensitivity --------------------------------------------------------------------------------------------------
def test_tail_runner_matches_a_full_forward_from_every_layer():
    from rankwise.allocation.sensitivity import TailRunner
    from rankwise.models.adapters import adapter_for

    model = tiny_llama(layers=3)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    runner = TailRunner(model, adapter_for(model), ids)
    for layer in range(3):
        assert torch.allclose(runner.logits_from(layer), runner.dense_logits, atol=1e-5)
    # a change in layer 2 seen from layer 2 equals the full forward with that change
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(0.5)
        full = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(runner.logits_from(2), full, atol=1e-5)
    assert len(runner.block_influence()) == 3


def test_profile_prediction_is_monotone_and_zero_when_dense():
    from rankwise.allocation.sensitivity import TargetProfile

    tail = [1.0 - i / 10 for i in range(11)]
    tp = TargetProfile(0, "q", 10, 10, ranks=[3, 6], kl=[0.2, 0.05], tail=tail)
    preds = [tp.predict(r) for r in range(1, 11)]
    assert all(a >= b for a, b in itertools.pairwise(preds))
    assert tp.predict(None) == 0.0
    assert tp.predict(3) == pytest.approx(0.2) and tp.predict(6) == pytest.approx(0.05)


@pytest.mark.slow
def test_profile_on_the_real_model_is_cached_and_leaves_it_unchanged(smollm, tmp_path, monkeypatch):
    from rankwise.allocation.sensitivity import ProfileSettings, profile
    from rankwise.decomposition.removal import remove_blocks

    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    model = copy.deepcopy(smollm.model)
    remove_blocks(model, range(3, 30))  # the real weights of its first 3 blocks: profiling 30 adds only time
    before = {k: v.clone() for k, v in model.state_dict().items() if "layers.2." in k}
    settings = ProfileSettings(method="svd", fractions=(0.5,), n_samples=1, seq_len=16)
    prof = profile(model, smollm.tokenizer, settings, progress=False)
    assert len(prof.targets) == 21 and not prof.cache_hit
    assert all(len(t.kl) == 1 and t.kl[0] >= 0 for t in prof.targets)
    assert sum(t.kl[0] for t in prof.targets) > 0
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k])
    again = profile(model, smollm.tokenizer, settings, progress=False)
    assert again.cache_hit and [t.kl for t in again.targets] == [t.kl for t in prof.targets]


@pytest.mark.slow
def test_allocate_cli_writes_a_plan_decompose_takes(smollm, tmp_path, capsys):
    from rankwise.decomposition.apply import decompose_ as decompose
    from rankwise.decomposition.removal import remove_blocks
    from rankwise.design.plan import Plan

    # The default model's real weights, its first 3 blocks saved as a folder: 30 blocks add only time.
    small = copy.deepcopy(smollm.model)
    remove_blocks(small, range(3, 30))
    folder = tmp_path / "smollm-3-blocks"
    small.save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    out = tmp_path / "plan.yaml"  # energy needs no profile
    code, stdout, err = run_cli(["allocate", str(folder), "--budget", "0.8", "--unit", "decoder-params",
                                 "--method", "svd", "--allocator", "energy", "-o", str(out), "--quiet"], capsys)
    assert code in (0, None), err
    assert "decoder-params" in stdout
    plan = Plan.from_file(out)
    model = copy.deepcopy(small)
    report = decompose(model, plan, progress=False)
    acc = accounting_for(small)
    kept = sum(t.params_after for t in report.targets) + sum(
        t.dense for t in acc.targets if (t.layer, t.role) not in {(r.layer, r.role) for r in report.targets})
    assert kept / acc.decoder_params <= 0.8
    assert kept / acc.decoder_params > 0.79
    assert (tmp_path / "plan.allocation.json").is_file()
    assert (tmp_path / "plan.png").stat().st_size > 0 and (tmp_path / "plan.svg").stat().st_size > 0
    assert f"rank map: {tmp_path / 'plan.png'}" in stdout.replace("\n", "")
    code, _, err = run_cli(["allocate", "smollm2-135m", "--budget", "2", "--unit", "decoder-params",
                            "-o", str(out)], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_allocated_plan_is_drawn_by_the_report_rank_map():
    """allocate's figure is the report's rank map: one cell per target, colour = the allocated kept fraction."""
    from rankwise.allocation.planner import allocate_plan, rank_map_targets
    from rankwise.reports.plots import rank_map

    model = tiny_llama(layers=3)
    result = allocate_plan(model, None, Budget.parse("0.6", "decoder-params"), method="svd", allocator="energy",
                           progress=False)
    targets = rank_map_targets(result)
    assert len(targets) == len(result.accounting.targets) == 21
    fig = rank_map({"model": "tiny", "plan": {"method": "svd"}, "targets": targets})
    grid = next(im for im in fig.axes[0].images if im.get_gid() == "rankmap").get_array()
    roles = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    for (layer, role), kept in result.kept_fractions().items():
        assert grid[roles.index(role), layer] == pytest.approx(kept)

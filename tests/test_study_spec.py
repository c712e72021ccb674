"""Study specs, presets and block removal: fast tests (tiny random models only for shapes)."""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli, tiny_llama
from rankwise.decomposition.removal import remove_blocks, restore_blocks
from rankwise.errors import RankwiseError
from rankwise.studies.points import dense_layers_at_spacing, evenly_spaced, expand_grid
from rankwise.studies.spec import load_spec, parse_spec

BASE = {"model": "smollm2-135m", "tasks": [{"name": "arc_easy", "limit": 8}], "grid": [{"preset": "layer-count"}]}


def _spec(**changes):
    data = {**BASE, **changes}
    return parse_spec({k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize("changes, message", [
    ({"tasks": [{"name": "arc_easy", "limit": 0}]}, "spec.tasks[0].limit: must be a positive integer, got 0"),
    ({"tasks": [{"name": "arc_easy", "limit": 8, "sample": 8}]}, "spec.tasks[0]: limit and sample are mutually"),
    ({"tasks": [{"name": "arc_eazy"}]}, "spec.tasks[0].name: unknown task 'arc_eazy' (did you mean 'arc_easy'?"),
    ({"tasks": [{"name": "arc_easy", "limt": 3}]}, "spec.tasks[0].limt: unknown field"),
    ({"dtype": "float8"}, "spec.dtype: 'float8' is not one of"),
    ({"grid": [{"preset": "layer-cont"}]}, "spec.grid[0].preset: 'layer-cont' is not one of layer-count"),
    ({"grid": [{"preset": "layer-count", "n": [1, 0]}]}, "spec.grid[0].n[1]: must be an integer >= 1, got 0"),
    ({"grid": [{"preset": "rank-sweep", "ranks": [8, -1]}]}, "spec.grid[0].ranks[1]: rank -1 is below 1"),
    ({"grid": [{"preset": "layer-count", "method": "qr"}]}, "spec.grid[0].method: 'qr' is not one of"),
    ({"grid": None, "search": None}, "spec.grid: give either grid"),
    ({"search": {"n_trials": 4}}, "spec.grid: give either grid"),
    ({"grid": None, "search": {"sampler": "cmaes"}}, "spec.search.sampler: 'cmaes' is not one of nsga2, tpe"),
    ({"grid": None, "search": {"budget": {"max_params_ratio": 1.5}}},
     "spec.search.budget.max_params_ratio: must be a number in (0, 1], got 1.5"),
    ({"objectives": [{"metric": "decode_ms"}]}, "spec.objectives[0].metric: 'decode_ms' is not a metric of this study"),
    ({"objectives": [{"metric": "params", "direction": "up"}]}, "spec.objectives[0].direction: 'up' is not one of"),
    ({"execution": {"heartbeat_interval": 10, "grace_period": 5}}, "spec.execution.grace_period: must be longer"),
    ({"tasks": [], "perplexity": None}, "spec.tasks: a study needs at least one task or perplexity"),
    ({"colour": "red"}, "spec.colour: unknown field"),
    ({"tasks": [{"name": "mmlu", "limit": 2, "pooled": True}]}, "spec.tasks[0].pooled: needs sample"),
    ({"tasks": [{"name": "mmlu", "sample": 2, "pooled": "yes"}]}, "spec.tasks[0].pooled: must be true or false"),
])
def test_spec_errors_name_the_field(changes, message):
    with pytest.raises(RankwiseError) as info:
        _spec(**changes)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_spec_defaults_and_hash():
    spec = _spec()
    assert [o.to_dict() for o in spec.objectives] == [{"metric": "mean_accuracy", "direction": "maximize"},
                                                       {"metric": "params_ratio", "direction": "minimize"}]
    assert spec.threads == 1 and spec.kind == "grid"
    # execution settings do not change the study's identity; subsets do
    assert _spec(execution={"heartbeat_interval": 2, "grace_period": 5}).hash == spec.hash
    assert _spec(tasks=[{"name": "arc_easy", "limit": 9}]).hash != spec.hash
    # a pooled sample is another subset; an unpooled one keeps the identity specs had before the field
    pooled = _spec(tasks=[{"name": "mmlu", "sample": 9, "pooled": True}])
    assert pooled.tasks[0].pooled and pooled.hash != _spec(tasks=[{"name": "mmlu", "sample": 9}]).hash
    assert "pooled" not in _spec(tasks=[{"name": "mmlu", "sample": 9}]).tasks[0].to_dict()
    ppl = _spec(tasks=[], perplexity={"windows": 2, "seq_len": 64})
    assert ppl.objectives[0].metric == "perplexity" and ppl.objectives[0].direction == "minimize"


def test_load_spec_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [arc_easy\ngrid: x\n")
    with pytest.raises(RankwiseError, match=r"study spec .*bad.yaml: not valid YAML \(line"):
        load_spec(bad)
    with pytest.raises(RankwiseError, match=r"missing\.yaml: No such file"):
        load_spec(tmp_path / "missing.yaml")
    good = tmp_path / "mine.yaml"
    good.write_text("tasks: [{name: arc_easy, limit: 4}]\ngrid: [{preset: single-layer, layers: [1, 2]}]\n")
    assert load_spec(good).name == "mine"


def test_spacing_helpers():
    assert evenly_spaced(1, 30) == [15]
    assert evenly_spaced(3, 30) == [5, 15, 25]
    assert evenly_spaced(30, 30) == list(range(30))
    assert dense_layers_at_spacing(5, 6, 30) == [2, 8, 14, 20, 26]
    assert dense_layers_at_spacing(5, 1, 30) == [12, 13, 14, 15, 16]


def test_presets_expand_from_the_adapter():
    roles = ["q", "k", "v", "o", "gate", "up", "down"]
    grid = [{"preset": p} for p in ("layer-count", "layer-removal", "tensor-sensitivity", "rank-sweep",
                                    "layer-density", "single-layer")]
    points = expand_grid(grid, 30, roles)
    by = {}
    for p in points:
        by.setdefault(p.sweep, []).append(p)
    assert [p.x for p in by["layer-count"]] == list(range(1, 31))
    assert by["layer-count"][2].plan == {"method": "tucker", "rank": 1, "layers": [5, 15, 25], "tensors": "all"}
    assert by["layer-removal"][2].kind == "remove" and by["layer-removal"][2].remove_layers == (5, 15, 25)
    assert by["layer-removal"][2].to_dict()["plan"] == {"remove_layers": [5, 15, 25]}
    assert len(by["tensor-sensitivity"]) == 7 + 7 + 2
    assert by["tensor-sensitivity"][7].plan["layers"] == [15]
    assert [p.label for p in by["rank-sweep"]] == ["r=1", "r=8", "r=32", "r=25%", "r=50%"]
    assert [p.x for p in by["layer-density"]] == [6, 5, 4, 3, 2, 1]
    assert [p.x for p in by["single-layer"]] == list(range(30))
    # the same preset on a 2-layer model: L and roles come from the model, not from constants
    small = expand_grid([{"preset": "layer-count"}, {"preset": "tensor-sensitivity"}], 2, ["q", "up"])
    assert [p.label for p in small] == ["n=1", "n=2", "q@all", "up@all", "q@L1", "up@L1", "attn@all", "mlp@all"]


def test_preset_range_errors():
    with pytest.raises(RankwiseError, match=r"spec.grid\[0\].n: 31 layers asked, the model has 30"):
        expand_grid([{"preset": "layer-count", "n": [31]}], 30, ["q"])
    with pytest.raises(RankwiseError, match=r"spec.grid\[0\].spacings: 5 layers at spacing 8 need 33 layers"):
        expand_grid([{"preset": "layer-density", "spacings": [8]}], 30, ["q"])
    with pytest.raises(RankwiseError, match=r"spec.grid\[1\].layers: layer 30 is out of range 0..29"):
        expand_grid([{"preset": "single-layer"}, {"preset": "single-layer", "layers": [30]}], 30, ["q"])


def test_block_removal_is_a_smaller_model_and_restores_exactly():
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
    blocks = list(model.model.layers)
    removal = remove_blocks(model, [0, 2])
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    # a model built with only blocks 1 and 3 gives the same logits, with and without a KV cache
    from transformers import DynamicCache

    from rankwise.models.forward import cache_kwargs

    with torch.inference_mode():
        removed = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :8], **cache_kwargs(model, cache)).logits
        rest = model(ids[:, 8:], **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), removed, rtol=1e-4, atol=1e-4)
    assert not torch.equal(removed, before)
    restore_blocks(removal)
    assert list(model.model.layers) == blocks and model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2, 3]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(RankwiseError, match=r"remove_layers: layer 4 is out of range 0\.\.3"):
        remove_blocks(model, [4])


def test_cli_bad_spec_is_one_line(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text("tasks: [{name: arc_easy, limit: -3}]\ngrid: [layer-count]\n")
    code, _, err = run_cli(["study", "run", str(bad), "--storage", f"sqlite:///{tmp_path}/x.db"], capsys)
    assert code == 2
    assert err.strip() == "error: spec.tasks[0].limit: must be a positive integer, got -3"


def test_cli_unreachable_storage_is_one_line(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("tasks: [{name: arc_easy, limit: 4}]\ngrid: [layer-count]\n")
    code, _, err = run_cli(["study", "run", str(spec), "--storage", "postgresql://127.0.0.1:1/x"], capsys)
    assert code == 2
    assert err.startswith("error: storage postgresql://127.0.0.1:1/x: cannot open (") and err.count("\n") == 1
    code, _, err = run_cli(["study", "status", "--storage", f"sqlite:///{tmp_path}/none/x.db"], capsys)
    assert code == 2 and err.startswith("error: storage sqlite:///") and err.count("\n") == 1


def test_cli_task_without_data_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANKWISE_DATA", str(tmp_path))
    spec = tmp_path / "s.yaml"
    spec.write_text("tasks: [{name: arc_easy, limit: 4}]\ngrid: [layer-count]\n")
    code, _, err = run_cli(["study", "run", str(spec), "--storage", f"sqlite:///{tmp_path}/x.db"], capsys)
    assert code == 2
    assert err.startswith("error: missing data file ") and "arc-easy/ARC-Easy-Test.jsonl" in err
    assert err.count("\n") == 1


def test_cli_status_of_empty_storage(tmp_path, capsys):
    code, _, err = run_cli(["study", "status", "--storage", f"sqlite:///{tmp_path}/x.db"], capsys)
    assert code == 2 and err == f"error: sqlite:///{tmp_path}/x.db holds no studies\n"
    code, _, err = run_cli(["study", "export", "--storage", f"sqlite:///{tmp_path}/x.db", "--name", "nope",
                            "--json", str(tmp_path / "o.json")], capsys)
    assert code == 2 and "no study named 'nope'" in err


def test_hidden_state_replay_is_bit_identical():
    """Replaying recorded block inputs gives exactly the full forward pass of a model changed at layer >= k."""
    from rankwise.studies.hidden import HiddenStateCache

    model = tiny_llama(layers=4)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 9), generator=gen), torch.randint(0, 256, (3, 5), generator=gen)]
    cache = HiddenStateCache(model, max_bytes=2**30)

    def measure():
        with torch.inference_mode():
            outs = [model(ids).logits for ids in batches]
            outs.append(model(batches[0], use_cache=True).logits)  # a cached call runs every block
        return outs

    with cache.session(None, record_all=True):
        dense = measure()
    assert sorted(cache.store) == [0, 1, 2, 3] and cache.verified
    down = model.model.layers[2].mlp.down_proj
    changed = torch.nn.Linear(down.in_features, down.out_features, bias=False)
    with torch.no_grad():
        changed.weight.copy_(down.weight * 0.5)
    model.model.layers[2].mlp.down_proj = changed
    full = measure()
    with cache.session(2):
        replayed = measure()
    assert cache.replayed_calls == 2 and cache.skipped_blocks == 4
    for a, b in zip(full, replayed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], dense[0])
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"  # blocks put back


def test_hidden_state_recording_stays_within_its_budget():
    from rankwise.studies.hidden import HiddenStateCache

    model = tiny_llama(layers=4)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    one_layer = 2 * 9 * 64 * 4  # batch x tokens x hidden x float32
    cache = HiddenStateCache(model, max_bytes=2 * one_layer)
    with cache.session(None, record_all=True), torch.inference_mode():
        model(ids)
    assert sorted(cache.store) == [0, 1] and cache.bytes == 2 * one_layer


def test_pareto_front_keeps_only_feasible_non_dominated_trials():
    """The front is computed from stored values and constraints: an over-budget trial never joins it, even when
    the sampler never recorded its constraint (the CI failure of an NSGA-II search)."""
    import optuna

    from rankwise.studies.export import pareto_numbers

    study = optuna.create_study(directions=["maximize", "minimize"])  # accuracy up, params ratio down
    rows = [((0.50, 0.90), 0.10),   # over budget and best accuracy: excluded
            ((0.45, 0.75), -0.05),  # on the front
            ((0.40, 0.60), -0.20),  # on the front
            ((0.40, 0.70), -0.10),  # dominated by the one above
            ((0.30, 0.60), -0.20),  # dominated
            ((0.45, 0.75), -0.05)]  # ties with the second: neither dominates, both stay
    for values, constraint in rows:
        trial = study.ask()
        trial.set_user_attr("constraint", [constraint])
        study.tell(trial, list(values))
    assert pareto_numbers(study) == [1, 2, 5]
    unconstrained = optuna.create_study(directions=["maximize", "minimize"])
    for values, _ in rows:
        unconstrained.add_trial(optuna.trial.create_trial(values=list(values),
                                                          distributions={}, params={}))
    assert pareto_numbers(unconstrained) == [0, 1, 2, 5]

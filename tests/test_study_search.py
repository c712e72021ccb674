"""A multi-objective search on the real bundled model under a parameter budget: Pareto front and export."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow


def test_nsga2_search_under_budget_returns_pareto_front(tmp_path, capsys):
    from rankwise.studies import run_study

    spec = {"name": "search", "model": "smollm2-135m", "tasks": [{"name": "arc_easy", "limit": 4}],
            "search": {"sampler": "nsga2", "n_trials": 20, "ranks": [1], "seed": 0, "population_size": 10,
                       "budget": {"max_params_ratio": 0.8}},
            "objectives": [{"metric": "mean_accuracy", "direction": "maximize"},
                           {"metric": "params_ratio", "direction": "minimize"}]}
    url = f"sqlite:///{tmp_path}/search.db"
    doc = run_study(spec, url, workers=1)
    complete = [t for t in doc["trials"] if t["state"] == "COMPLETE"]
    assert len(complete) == 20 and len(doc["trials"]) == 20
    front = doc["pareto_front"]
    assert front, "no feasible trial: the Pareto front is empty"
    by_number = {t["number"]: t for t in complete}
    for n in front:  # only trials within the budget, none dominated by another feasible trial
        t = by_number[n]
        assert t["params_ratio"] <= 0.8
        for other in complete:
            if other["params_ratio"] <= 0.8 and other["number"] != n:
                assert not (other["mean_accuracy"] >= t["mean_accuracy"] and other["params_ratio"] <= t["params_ratio"]
                            and (other["mean_accuracy"], other["params_ratio"]) != (t["mean_accuracy"],
                                                                                    t["params_ratio"]))
    for t in complete:
        assert t["sweep"] == "search" and t["kind"] in ("decompose", "dense")
        if t["kind"] == "decompose":
            assert t["plan"]["rank"] == 1 and t["decomposition"]["params_after"] == t["params"]
    out_json = tmp_path / "s.json"
    code, _, err = run_cli(["study", "export", "--storage", url, "--json", str(out_json), "--csv",
                            str(tmp_path / "s.csv")], capsys)
    assert code in (0, None), err
    exported = json.loads(out_json.read_text())
    assert [t["number"] for t in exported["trials"]] == list(range(20))
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 1 + 20

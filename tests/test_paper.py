"""``rankwise paper``: the plan of each mode (fast, no model), the headlines from a results document, and a
tiny real run end to end (SmolLM2-135M and MiniLM-L6, a few items per task), its report opened in Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from rankwise.paper.headlines import headlines
from rankwise.paper.plan import build_plan, count_points, layer_counts, plan_lines

ROLES = ("q", "k", "v", "o", "gate", "up", "down")  # SmolLM2's (llama) roles
SWEEPS = ["layer-count", "layer-removal", "rank-sweep", "tensor-sensitivity", "single-layer", "layer-density"]


def _plan(mode, tmp_path, **kw):
    plan = build_plan(mode, "smollm2-135m", 30, ROLES, data=tmp_path, encoder_layers=6, **kw)
    for s in plan.studies:
        plan.points[s["name"]] = count_points(s, 6 if s["model"] == "minilm-l6" else 30, ROLES)
    return plan


@pytest.mark.parametrize("mode, counts, items, total", [
    ("quick", [1, 2, 3, 4, 6], 25, 21),
    ("standard", [1, *range(2, 31, 2)], 100, 16 + 16 + 5 + 9 + 8 + 4),
    ("full", list(range(1, 31)), None, 30 + 30 + 5 + 16 + 30 + 6),
])
def test_plan_of_each_mode(tmp_path, mode, counts, items, total):
    plan = _plan(mode, tmp_path)
    decoder, enc = plan.studies
    points = plan.points[decoder["name"]]
    assert list(points) == SWEEPS
    assert sum(points.values()) == total
    assert layer_counts(mode, 30) == counts
    assert points["layer-count"] == points["layer-removal"] == len(counts)
    arc = next(t for t in decoder["tasks"] if t["name"] == "arc_easy")
    assert arc.get("sample") == items
    mmlu = next(t for t in decoder["tasks"] if t["name"] == "mmlu")
    assert mmlu.get("sample") == {"quick": 20, "standard": 100, "full": None}[mode]
    assert mmlu.get("pooled", False) == (mode != "full")  # drawn from all subjects' questions together
    names = [t["name"] for t in decoder["tasks"]]
    assert ("gsm8k" in names) == (mode == "full")
    assert "winogrande" not in names  # no data file in tmp_path
    assert any("winogrande skipped" in n for n in plan.notes)
    assert enc["model"] == "minilm-l6" and enc["tasks"][0]["name"] == "stsb"
    assert plan.points[enc["name"]] == {"layer-count": 3 if mode == "quick" else 6}
    text = "\n".join(plan_lines(plan))
    assert f"layer-count: {len(counts)} points" in text and "wikitext-2 token perplexity" in text


def test_plan_includes_winogrande_when_its_data_exists(tmp_path):
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text("{}\n")
    plan = _plan("standard", tmp_path)
    assert "winogrande" in [t["name"] for t in plan.studies[0]["tasks"]]
    assert not any("winogrande" in n for n in plan.notes)
    assert "winogrande" not in [t["name"] for t in _plan("quick", tmp_path).studies[0]["tasks"]]


def test_shrunk_plan_keeps_every_sweep(tmp_path):
    plan = _plan("quick", tmp_path, items=4, points=2)
    decoder = plan.studies[0]
    assert all(t["sample"] == 4 for t in decoder["tasks"])
    assert "mmlu 4 items (pooled over its 57 subjects)" in "\n".join(plan_lines(plan))
    points = plan.points[decoder["name"]]
    assert list(points) == SWEEPS and max(points.values()) <= 2
    assert decoder["name"] != _plan("quick", tmp_path).studies[0]["name"]  # never resumes a full-size study


def _trial(sweep, x, reduction, accs, n=40, se=0.05, eff=None):
    return {"number": hash((sweep, x)) % 1000, "state": "COMPLETE", "sweep": sweep, "label": f"n={x}", "x": x,
            "size_reduction": reduction, "efficiency": eff,
            "metrics": {k: {"metric": "acc", "value": v, "stderr": se, "n": n} for k, v in accs.items()}}


def test_headlines_from_a_document():
    eff = {"latency_change": -0.04, "decode_ms": 9.6, "decode_ms_dense": 10.0, "decode_ms_iqr_pct": 3.0,
           "ideal_latency_change": -0.08, "energy_change": None, "energy_reason": "no RAPL counter",
           "protocol": "decode batch 1, 16 tokens after 64"}
    doc = {"dense": _trial("dense", None, 0.0, {"arc_easy": 0.6, "mmlu": 0.4}),
           "trials": [_trial("layer-count", 1, 0.03, {"arc_easy": 0.58, "mmlu": 0.4}),
                      _trial("layer-count", 3, 0.095, {"arc_easy": 0.5, "mmlu": 0.3}, eff=eff),
                      _trial("layer-count", 6, 0.19, {"arc_easy": 0.3, "mmlu": 0.25}),
                      _trial("layer-removal", 3, 0.095, {"arc_easy": 0.45, "mmlu": 0.3}),
                      {**_trial("layer-removal", 6, 0.19, {"arc_easy": 0.2, "mmlu": 0.2}), "state": "FAIL"}]}
    out = headlines(doc)
    first, second, third = out["lines"]
    assert "layer-count n=3" in first and "-10.0 points" in first and "n=40 items" in first and "±" in first
    assert out["numbers"]["nine_percent"]["change"] == pytest.approx(-0.1)
    assert "n=3 0.400 vs 0.375" in second and "n=6" not in second  # the FAIL removal is not compared
    assert "-4.0%" in third and "no RAPL counter" in third and "16 tokens after 64" in third
    doc["dense"]["metrics"]["mmlu"]["stderr"] = None  # MMLU's group reports none: binomial from n, p
    assert headlines(doc)["numbers"]["dense_stderr"] == pytest.approx(
        ((0.05 ** 2 + 0.4 * 0.6 / 39) ** 0.5) / 2)
    doc["trials"][1]["efficiency"] = {"protocol": "not measurable: no decode step"}
    assert "not measured (not measurable: no decode step)" in headlines(doc)["lines"][2]


def test_report_is_rebuilt_only_when_its_results_or_rankwise_change(tmp_path, monkeypatch):
    from rankwise.paper import run
    from rankwise.paper.run import REPORT_STAMP, _report_is_current, report_stamp

    doc = {"trials": [{"number": 0, "metrics": {"arc_easy": {"value": 0.5}}}], "spec": {"name": "s"}}
    (tmp_path / "report.html").write_text("<html></html>")
    assert not _report_is_current(tmp_path, report_stamp(doc))  # no stamp: built by an older rankwise
    (tmp_path / REPORT_STAMP).write_text(report_stamp(doc) + "\n")
    assert _report_is_current(tmp_path, report_stamp(doc))
    changed = {**doc, "trials": [*doc["trials"], {"number": 1}]}
    assert not _report_is_current(tmp_path, report_stamp(changed))
    monkeypatch.setattr(run, "installed_version", lambda: "9.9.9")
    assert not _report_is_current(tmp_path, report_stamp(doc))


def test_paper_rejects_two_modes(capsys):
    code, _, err = run_cli(["paper", "--quick", "--full"], capsys)
    assert code == 2 and "choose one of --quick, --standard, --full" in err


@pytest.mark.slow
def test_paper_quick_end_to_end(tmp_path, capsys, data_dir):
    out = tmp_path / "paper"
    argv = ["paper", "--quick", "--items", "4", "--points", "1", "-o", str(out), "-q"]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code in (0, None), stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "rankwise.study/1"
    assert {t["sweep"] for t in doc["trials"] if t["state"] == "COMPLETE"} == set(SWEEPS)
    metrics = doc["dense"]["metrics"]
    assert all(m["n"] == 4 for m in metrics.values() if m["metric"] == "acc")  # MMLU: 4 pooled questions
    assert metrics["mmlu"]["stderr"] is not None
    enc = json.loads((out / "encoder-results.json").read_text())
    assert enc["spec"]["model"] == "minilm-l6" and enc["dense"]["metrics"]["stsb"]["metric"] == "spearman"
    assert (out / "report" / "report.html").is_file() and (out / "encoder-report" / "report.html").is_file()
    assert "9%-size point" in stdout and "vs removing the same layers" in stdout and "latency" in stdout
    assert "STS-B spearman" in stdout and str(out / "report" / "report.html") in stdout
    assert "winogrande skipped" in stderr
    # a rerun resumes: every point is done, nothing runs twice
    built = [(out / r / "report.html").stat().st_mtime_ns for r in ("report", "encoder-report")]
    code, stdout2, stderr2 = run_cli(argv, capsys)
    assert code in (0, None), stderr2
    assert "9%-size point" in stdout2
    # nothing changed: the reports are not rebuilt (the same files, not rewritten)
    assert [(out / r / "report.html").stat().st_mtime_ns for r in ("report", "encoder-report")] == built
    again = json.loads((out / "results.json").read_text())
    assert [t["number"] for t in again["trials"]] == [t["number"] for t in doc["trials"]]

    from test_report_study import ARTIFACTS, CHROMIUM, open_in_chromium

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen = open_in_chromium(out / "report" / "report.html", ARTIFACTS / "paper-quick.png", tmp_path / "profile")
    shutil.copy2(out / "report" / "report.html", ARTIFACTS / "paper-quick.html")
    assert seen["page_errors"] == []
    assert seen["rows"] == len(doc["trials"])
    assert all(i["complete"] and i["w"] > 0 for i in seen["images"])

"""Reports, fast lane: figure content against the data, tables, best points, the report folder and its CLI.

The document here is hand-built (a plotting-shape fixture: a few sweeps, efficiency without energy, and
FAIL / RUNNING / WAITING trials); the report of a real study of the default model, opened in Chromium,
is in test_report_study.py.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest

from helpers import run_cli
from rankwise.errors import RankwiseError
from rankwise.reports import build_report, check_document, load_document, load_source, plots, spectra
from rankwise.reports import document as d
from rankwise.reports.figures import study_figures
from rankwise.reports.pareto import dominates, pareto_front
from rankwise.reports.style import FigureUnavailable, caption
from rankwise.reports.tables import best_under_budgets, rows, to_csv

DENSE_PARAMS = 134_515_008
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _metrics(arc: float, piqa: float, ppl: float) -> dict:
    return {
        "arc_easy": {"metric": "acc", "value": arc, "stderr": 0.03, "n": 200, "chance": 0.25,
                     "protocol": "0-shot, first 200 items"},
        "piqa": {"metric": "acc", "value": piqa, "stderr": 0.02, "n": 200, "chance": 0.5,
                 "protocol": "0-shot, first 200 items"},
        "wikitext": {"metric": "token_perplexity", "value": ppl, "stderr": None, "n": 4,
                     "protocol": "4 windows of 512 tokens"},
    }


def _trial(number: int, sweep: str, label: str, ratio: float, arc: float, piqa: float, ppl: float, *,
           plan: dict | None = None, efficiency: dict | None = None, decomposition: dict | None = None) -> dict:
    return {"number": number, "state": "COMPLETE", "sweep": sweep, "label": label, "x": number, "plan": plan,
            "kind": "decompose", "params": int(DENSE_PARAMS * ratio), "params_ratio": ratio,
            "size_reduction": 1 - ratio, "bytes": int(4 * DENSE_PARAMS * ratio),
            "metrics": _metrics(arc, piqa, ppl), "mean_accuracy": (arc + piqa) / 2, "efficiency": efficiency,
            "decomposition": decomposition, "seconds": 12.5, "error": None, "worker": "w1"}


def _decomp_report(layers: list[int], rank: int) -> dict:
    targets = []
    for layer in layers:
        for role in ROLES:
            m, n = (1536, 576) if role in ("gate", "up") else (576, 1536) if role == "down" else \
                (192, 576) if role in ("k", "v") else (576, 576)
            after = rank * (m + n) + rank * rank
            targets.append({"layer": layer, "role": role, "name": f"model.layers.{layer}.{role}", "method": "tucker",
                            "shape": [m, n], "rank_spec": str(rank), "ranks": [rank, rank], "form": "three_factor",
                            "params_before": m * n, "params_after": after, "rel_error": 0.9,
                            "weighted_error": None, "kept_dense": False, "reason": ""})
    return {"model": "smollm2-135m", "plan": {"method": "tucker", "rank": rank, "layers": layers, "tensors": "all"},
            "fold": "auto", "summary": {"reduction_pct_of_whole_model": 2.6 * len(layers),
                                        "targets_decomposed": len(targets)},
            "targets": targets, "params_before": DENSE_PARAMS, "params_after": DENSE_PARAMS, "bytes_before": 0,
            "bytes_after": 0, "seconds": 1.0}


def make_document() -> dict:
    """Three sweeps (layer count with efficiency, tensor sensitivity, single layer) and unfinished trials."""
    trials = []
    n = 0
    for k in range(1, 5):  # layer-count sweep: k layers decomposed at rank 1
        eff = {"decode_ms": 30 - k, "decode_ms_dense": 30.0, "latency_change": -k / 30, "ideal_latency_change": -0.03 * k,
               "energy_j": None, "energy_change": None, "energy_reason": "no RAPL zones under /sys/class/powercap",
               "protocol": "decode batch 1, 32 tokens after 128, 2 threads, median of 5"}
        trials.append(_trial(n, "layer-count", f"n={k}", 1 - 0.026 * k, 0.60 - 0.05 * k, 0.65 - 0.03 * k, 20 + 5 * k,
                             plan={"method": "tucker", "rank": 1, "layers": list(range(k)), "tensors": "all"},
                             efficiency=eff, decomposition=_decomp_report(list(range(k)), 1)))
        n += 1
    for layer in (2, 17):  # tensor sensitivity: one (layer, role) at a time
        for i, role in enumerate(ROLES):
            trials.append(_trial(n, "tensor-sensitivity", f"L{layer} {role}", 0.998, 0.59 - 0.01 * i - 0.001 * layer,
                                 0.64, 21.0 + i, plan={"method": "tucker", "rank": 1, "layers": [layer],
                                                       "tensors": [role]}))
            n += 1
    trials.append(_trial(n, "tensor-sensitivity", "q@all", 0.9, 0.50, 0.60, 30.0,  # one role in every layer
                         plan={"method": "tucker", "rank": 1, "layers": "all", "tensors": ["q"]}))
    n += 1
    for layer in (0, 29):  # single layer: every role of one layer
        trials.append(_trial(n, "single-layer", f"L{layer}", 0.974, 0.55, 0.62, 24.0,
                             plan={"method": "tucker", "rank": 1, "layers": [layer], "tensors": "all"}))
        n += 1
    trials.append({"number": n, "state": "FAIL", "sweep": "layer-count", "label": "n=8", "x": 8, "plan": None,
                   "kind": "decompose", "params": None, "params_ratio": None, "size_reduction": None, "bytes": None,
                   "metrics": {}, "mean_accuracy": None, "efficiency": None, "decomposition": None, "seconds": 3.1,
                   "error": "RuntimeError: out of memory <script>alert(1)</script>", "worker": "w2"})
    trials.append({"number": n + 1, "state": "RUNNING", "sweep": "layer-count", "label": "n=9", "x": 9,
                   "plan": None, "kind": "decompose", "metrics": None, "worker": "w1"})
    trials.append({"number": n + 2, "state": "WAITING", "sweep": "layer-count", "label": "n=10", "x": 10})
    dense = {"number": None, "state": "COMPLETE", "sweep": "dense", "label": "dense", "x": None, "plan": None,
             "kind": "dense", "params": DENSE_PARAMS, "params_ratio": 1.0, "size_reduction": 0.0,
             "bytes": 4 * DENSE_PARAMS, "metrics": _metrics(0.62, 0.67, 19.5), "mean_accuracy": 0.645,
             "efficiency": None, "decomposition": None, "seconds": 10.0, "error": None}
    return {"schema": "rankwise.study/1", "study": "handmade", "storage": "sqlite:///handmade.db",
            "spec": {"model": "smollm2-135m", "sweeps": ["layer-count", "tensor-sensitivity", "single-layer"]},
            "environment": {"model": "smollm2-135m", "dtype": "float32", "device": "cpu",
                            "versions": {"rankwise": "0.1.0", "torch": "2.13.0"}, "threads": 2, "n_layers": 30},
            "dense": dense, "trials": trials}


@pytest.fixture
def doc() -> dict:
    return make_document()


# --- figures: content matches the data --------------------------------------------------------------------


def test_accuracy_vs_size_has_one_errorbar_line_per_benchmark_with_every_point(doc):
    fig = plots.accuracy_vs_size(doc, "layer-count")
    ax = fig.axes[0]
    containers = [c for c in ax.containers if c.get_label() and not c.get_label().startswith("_")]
    assert [c.get_label() for c in containers] == ["arc_easy acc", "piqa acc"]  # perplexity is not a score line
    done = d.complete(doc, "layer-count")
    assert len(done) == 4
    for c, bench in zip(containers, ("arc_easy", "piqa"), strict=True):
        line, _caps, (bars,) = c.lines[0], c.lines[1], c.lines[2]
        xs, ys = line.get_xdata(), line.get_ydata()
        assert list(xs) == pytest.approx([100 * t["size_reduction"] for t in done])
        assert list(ys) == pytest.approx([100 * t["metrics"][bench]["value"] for t in done])
        assert c.has_yerr and len(bars.get_segments()) == len(done)
        seg = bars.get_segments()[0]
        assert seg[1][1] - seg[0][1] == pytest.approx(2 * 100 * 0.03 if bench == "arc_easy" else 2 * 100 * 0.02)
    gids = {line.get_gid() for line in ax.lines}
    assert {"dense:arc_easy", "dense:piqa", "chance:arc_easy", "chance:piqa"} <= gids
    chance = next(line for line in ax.lines if line.get_gid() == "chance:arc_easy")
    assert chance.get_ydata()[0] == pytest.approx(25.0)
    text = caption(fig)
    assert "standard error" in text and "0-shot, first 200 items" in text and "n=200" in text
    assert "%" in ax.get_xlabel() and "%" in ax.get_ylabel()


def test_efficiency_plot_measured_vs_ideal_and_says_why_energy_is_absent(doc):
    fig = plots.efficiency_vs_size(doc, "layer-count")
    lat, en = fig.axes[0], fig.axes[1]
    measured = next(line for line in lat.lines if line.get_gid() == "measured:latency")
    ideal = next(line for line in lat.lines if line.get_gid() == "ideal:latency")
    done = d.complete(doc, "layer-count")
    assert list(measured.get_ydata()) == pytest.approx([-100 * t["efficiency"]["latency_change"] for t in done])
    assert list(ideal.get_ydata()) == pytest.approx([-100 * t["efficiency"]["ideal_latency_change"] for t in done])
    assert not [line for line in en.lines if (line.get_gid() or "").startswith("measured")]
    assert any(t.get_gid() == "absent:energy" for t in en.texts)
    # the ideal energy is the same bytes bound (a memory-bound step's energy scales with the bytes it reads)
    ideal_en = next(line for line in en.lines if line.get_gid() == "ideal:energy")
    assert list(ideal_en.get_ydata()) == list(ideal.get_ydata())
    assert "Energy not measured: no RAPL zones" in caption(fig) and "the ideal alone is drawn" in caption(fig)
    assert "decode batch 1" in caption(fig)


def test_efficiency_plot_with_measured_energy(doc):
    doc = copy.deepcopy(doc)
    done = d.complete(doc, "layer-count")
    for k, t in enumerate(done, start=1):
        t["efficiency"].update(energy_j=0.5 - 0.01 * k, energy_change=-0.02 * k, energy_reason=None)
    fig = plots.efficiency_vs_size(doc, "layer-count")
    en = fig.axes[1]
    measured = next(line for line in en.lines if line.get_gid() == "measured:energy")
    assert list(measured.get_xdata()) == pytest.approx([100 * t["size_reduction"] for t in done])
    assert list(measured.get_ydata()) == pytest.approx([2.0 * k for k in range(1, len(done) + 1)])
    assert len(next(line for line in en.lines if line.get_gid() == "ideal:energy").get_ydata()) == len(done)
    assert not any(t.get_gid() == "absent:energy" for t in en.texts)
    assert "not measured" not in caption(fig)


def test_pareto_front_is_computed_and_highlighted(doc):
    fig = plots.pareto_plot(doc, "size_reduction", "mean_accuracy")
    ax = fig.axes[0]
    by_gid = {c.get_gid(): c for c in ax.collections}
    complete = d.complete(doc)
    n_front = len(by_gid["front"].get_offsets())
    n_rest = len(by_gid["trials"].get_offsets())
    dense_pts = [line for line in ax.lines if line.get_gid() == "dense"]
    assert n_front + n_rest + len(dense_pts) == len(complete) + 1  # every COMPLETE trial plus dense
    pts = [(t["size_reduction"], t["mean_accuracy"]) for t in [doc["dense"], *complete]]
    expected = pareto_front(pts, [True, True])
    dense_on_front = 0 in expected
    assert n_front == len(expected) - (1 if dense_on_front else 0)
    front_xy = {(round(x, 6), round(y, 6)) for x, y in by_gid["front"].get_offsets()}
    assert front_xy == {(round(100 * pts[i][0], 6), round(100 * pts[i][1], 6)) for i in expected if i != 0}


def test_pareto_front_definition():
    pts = [(1, 1), (2, 0.5), (0.5, 2), (1, 1), (0.9, 0.9), (2, 0.4)]
    assert pareto_front(pts, [True, True]) == [0, 1, 2, 3]  # duplicates of a front point both stay
    assert pareto_front(pts, [False, False]) == [2, 4, 5]
    assert dominates((1, 1), (0.9, 0.9), [True, True]) and not dominates((1, 1), (1, 1), [True, True])


def test_sensitivity_heatmap_cells_are_single_target_trials(doc):
    fig = plots.sensitivity_heatmap(doc, n_layers=30)
    ax = fig.axes[0]
    im = next(a for a in ax.images if a.get_gid() == "heatmap")
    grid = im.get_array()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [*ROLES, "all"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*map(str, range(30)), "all"]
    assert grid.shape == (8, 31)
    assert int((~grid.mask).sum()) == 2 * 7 + 2 + 1  # 14 single-(layer, role), 2 single-layer, 1 q@all
    assert grid[0, 30] == pytest.approx(100 * (0.55 - doc["dense"]["mean_accuracy"]))
    dense = doc["dense"]["mean_accuracy"]
    t = next(t for t in doc["trials"] if t["label"] == "L17 v")
    assert grid[ROLES.index("v"), 17] == pytest.approx(100 * (t["mean_accuracy"] - dense))
    assert grid[7, 29] == pytest.approx(100 * (0.585 - dense))
    assert grid.mask[0, 5]  # layer 5 never measured
    assert "percentage points" in caption(fig)


def test_rank_map_colours_are_kept_fractions(doc):
    report = doc["trials"][1]["decomposition"]  # layers 0 and 1 at rank 1
    fig = plots.rank_map(report, n_layers=30)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (7, 30)
    q = next(t for t in report["targets"] if t["layer"] == 1 and t["role"] == "q")
    assert grid[0, 1] == pytest.approx(q["params_after"] / q["params_before"])
    assert (grid[:, 2:] == 1.0).all()
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"1"}


def test_spectra_figures_have_one_line_per_layer_and_role():
    import numpy as np

    rng = np.random.default_rng(0)
    targets = []
    for layer in range(3):
        for role, shape in (("q", (8, 8)), ("down", (8, 16))):
            s = np.sort(rng.random(8))[::-1] * (layer + 1)
            targets.append({"layer": layer, "role": role, "shape": list(shape), "singular_values": s.tolist()})
    doc = {"model": "toy", "dtype": "float32", "n_layers": 3, "roles": ["q", "down"], "targets": targets}
    fig = spectra.spectra_figure(doc)
    axes = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert [a.get_title().split()[0] for a in axes] == ["q", "down"]
    for ax in axes:
        assert len(ax.lines) == 3
        assert ax.lines[0].get_ydata()[0] == pytest.approx(1.0)
    energy = spectra.energy_figure(doc)
    for ax in [a for a in energy.axes if a.get_title()]:
        curves = [line for line in ax.lines if (line.get_gid() or "").startswith("energy:")]
        assert len(curves) == 3 and curves[0].get_ydata()[-1] == pytest.approx(100.0)
    ranks = spectra.energy_rank_figure(doc)
    for ax in ranks.axes:
        assert len([line for line in ax.lines if (line.get_gid() or "").startswith("erank")]) == 2


def test_figures_without_data_raise_with_a_reason(doc):
    empty = {**doc, "trials": [t for t in doc["trials"] if t["state"] != "COMPLETE"]}
    for draw in (lambda: plots.accuracy_vs_size(empty), lambda: plots.efficiency_vs_size(empty),
                 lambda: plots.pareto_plot({**empty, "dense": None}), lambda: plots.sensitivity_heatmap(empty)):
        with pytest.raises(FigureUnavailable):
            draw()
    entries = {e.name: e for e in study_figures(doc)}
    assert entries["accuracy-vs-size-single-layer"].reason.startswith("every trial of sweep")
    assert entries["accuracy-vs-size-layer-count"].figure is not None
    assert entries["sensitivity"].figure is not None


# --- tables --------------------------------------------------------------------------------------------------


def test_best_points_under_budgets(doc):
    best = {b["budget"]: b for b in best_under_budgets(doc)}
    # keeping <= 90%: n=4 (89.6%, mean 46.5%) and q@all (90.0%, mean 55.0%); n=3 keeps 92.2%
    assert best[0.90]["trial"]["label"] == "q@all" and best[0.90]["candidates"] == 2
    fits = [t for t in d.complete(doc) if t["params_ratio"] <= 0.90]
    assert best[0.90]["value"] == max(t["mean_accuracy"] for t in fits)
    assert best[0.50]["trial"] is None and best[0.50]["candidates"] == 0


def test_rows_and_csv_keep_unfinished_trials(doc):
    table = rows(doc)
    assert len(table) == len(doc["trials"]) + 1
    states = [r["state"] for r in table[1:]]
    assert states.count("FAIL") == 1 and states.count("RUNNING") == 1 and states.count("WAITING") == 1
    parsed = list(csv.DictReader(to_csv(doc).splitlines()))
    assert len(parsed) == len(doc["trials"]) + 1
    fail = next(r for r in parsed if r["state"] == "FAIL")
    assert fail["metric:arc_easy"] == "" and "out of memory" in fail["error"]


# --- report folder and CLI ------------------------------------------------------------------------------------


def test_report_folder_with_failed_and_pending_trials(doc, tmp_path):
    out = tmp_path / "rep"
    summary = build_report(doc, out, source="handmade.json")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["figures", "report.html", "report.json", "report.md", "trials.csv"]
    assert summary["state_counts"] == {"COMPLETE": 21, "RUNNING": 1, "WAITING": 1, "FAIL": 1}
    page = (out / "report.html").read_text()
    assert page.count('data-trial="') == len(doc["trials"])
    assert "state-FAIL" in page and "state-RUNNING" in page and "state-WAITING" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page
    drawn = [f for f in summary["figures"] if f["files"]]
    assert page.count("data:image/png;base64,") == len(drawn) >= 5
    for f in drawn:
        assert (out / f["files"]["png"]).stat().st_size > 1000 and (out / f["files"]["svg"]).exists()
    assert "## Best points" in (out / "report.md").read_text()
    assert "error: RuntimeError: out of memory" in page
    # a second report (here: of the unfinished trials alone) replaces the first in one rename
    pending = {**doc, "trials": [t for t in doc["trials"] if t["state"] != "COMPLETE"]}
    again = build_report(pending, out, source="pending.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temp folders left behind
    assert json.loads((out / "report.json").read_text())["source"] == "pending.json"
    assert again["best_under_budgets"][0]["trial"] is None
    assert (out / "report.html").read_text().count('data-trial="') == 3


def test_report_refuses_to_replace_a_folder_that_is_not_a_report(doc, tmp_path):
    (tmp_path / "data.txt").write_text("precious")
    with pytest.raises(RankwiseError, match="not a rankwise report"):
        build_report(doc, tmp_path)
    assert (tmp_path / "data.txt").read_text() == "precious"


def test_document_checks(tmp_path):
    with pytest.raises(RankwiseError, match="does not exist"):
        load_document(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RankwiseError, match="not valid JSON"):
        load_document(bad)
    with pytest.raises(RankwiseError, match="schema"):
        check_document({"schema": "something/2", "trials": []})
    with pytest.raises(RankwiseError, match="lacks 'number' or 'state'"):
        check_document({"schema": "rankwise.study/1", "trials": [{"number": 1}]})


def test_nan_and_missing_values_are_missing_not_zero(doc):
    doc = copy.deepcopy(doc)
    doc["trials"][0]["metrics"]["arc_easy"]["value"] = float("nan")
    doc["trials"][0]["mean_accuracy"] = None
    assert d.metric_value(doc["trials"][0], "arc_easy") is None
    fig = plots.accuracy_vs_size(doc, "layer-count")
    arc = next(c for c in fig.axes[0].containers if c.get_label() == "arc_easy acc")
    assert len(arc.lines[0].get_xdata()) == 3 and not any(math.isnan(y) for y in arc.lines[0].get_ydata())


def test_cli_report_from_json(doc, tmp_path, capsys):
    doc["trials"] = [{**t, "efficiency": None, "decomposition": None}  # few figures: the CLI path is tested here
                     for t in d.trials(doc, sweep="layer-count")]
    path = tmp_path / "study.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "rep"
    code, _, stderr = run_cli(["report", str(path), "--pareto", "size_reduction,nope", "-o", str(out)], capsys)
    assert code == 2 and "unknown objective 'nope'" in stderr and not out.exists()  # checked before drawing
    code, stdout, stderr = run_cli(["report", str(path), "--pareto", "params,arc_easy", "-o", str(out)], capsys)
    assert code in (0, None), stderr
    assert (out / "report.html").exists() and str(out / "report.html") in stdout
    summary = json.loads((out / "report.json").read_text())
    assert summary["best_under_budgets"][0]["trial"] is not None
    figures = {f["name"]: f for f in summary["figures"]}
    assert figures["pareto-arc-easy-vs-params"]["files"]["png"] == "figures/pareto-arc-easy-vs-params.png"


@pytest.mark.parametrize("argv,message", [
    (["report", "/nonexistent/study.json"], "does not exist"),
    (["report", "{tmp}/wrong.json"], "schema"),
])
def test_cli_report_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "wrong.json").write_text(json.dumps({"schema": "other", "trials": []}))
    code, _, stderr = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_storage_url_goes_to_the_studies_exporter(tmp_path):
    url = f"sqlite:///{tmp_path}/none.db"
    try:
        import rankwise.studies.export  # noqa: F401
    except ImportError:
        with pytest.raises(RankwiseError, match=r"needs rankwise\.studies"):
            load_source(url)
        return
    with pytest.raises(RankwiseError):
        load_source(url, "no-such-study")


def test_documents_round_trip_through_json(doc, tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    assert load_source(str(path)) == doc
    with pytest.raises(RankwiseError, match="holds study"):
        load_source(str(path), "another")


def test_figure_files_are_written(doc, tmp_path):
    from rankwise.reports.style import save_figure

    paths = save_figure(plots.pareto_plot(doc), tmp_path, "p")
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in Path(paths["svg"]).read_bytes()[:2000]


def test_cli_spectra_needs_the_model_name(doc, tmp_path, capsys):
    doc["environment"] = {}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(doc))
    code, _, stderr = run_cli(["report", str(path), "--spectra", "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "environment.model" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


"""Reports of a real study of the default model, opened in headless Chromium; ``inspect --plot`` on a real model.

The study is tiny but real: SmolLM2-135M, ARC-Easy first 8 items, decode latency, run by
``rankwise.studies`` on SQLite. It is left in every state a report must show: one trial FAIL (claimed by a
worker whose trial raised, recorded as the engine records failures: error attribute, then FAIL), three
COMPLETE, one claimed by a worker still running it, and the rest WAITING (the worker was stopped early).

The browser is Debian's ``chromium`` (``apt-get install chromium``) driven by Playwright through its
executable path; the screenshot is written to ``tests/artifacts/`` (path printed).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from helpers import run_cli
from rankwise.reports import document as d
from rankwise.reports import plots
from rankwise.reports.style import caption

CHROMIUM = os.environ.get("RANKWISE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("RANKWISE_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SPEC = {
    "name": "report-real", "model": "smollm2-135m", "threads": 1,
    "tasks": [{"name": "arc_easy", "limit": 8}],
    "efficiency": {"context": 16, "new_tokens": 4, "repeats": 3},
    "grid": [{"preset": "layer-count", "n": [1, 2, 3]},
             {"preset": "single-layer", "layers": [2, 17]},
             {"plan": {"method": "tucker", "rank": 1, "layers": [2], "tensors": ["q"]},
              "label": "q@L2", "sweep": "tensor-sensitivity"}],
}


@pytest.fixture(scope="module")
def real_study(tmp_path_factory, data_dir) -> dict:
    """The results document of the tiny study above, in every trial state (module docstring)."""
    from optuna.trial import TrialState

    from rankwise.studies import run_study, work
    from rankwise.studies.engine import _claim_waiting, load_study
    from rankwise.studies.export import study_document

    url = f"sqlite:///{tmp_path_factory.mktemp('study')}/study.db"
    run_study(SPEC, url, workers=0)  # create and queue every point
    study, _, _ = load_study(url, SPEC["name"])
    crashed = _claim_waiting(study)  # a worker claims a trial and it raises: recorded as the engine records it
    crashed.set_user_attr("error", "RuntimeError: worker crashed while decomposing (report test)")
    study.tell(crashed, state=TrialState.FAIL)
    stop, done = threading.Event(), []

    def one_more(record: dict) -> None:
        done.append(record)
        if len(done) >= 3:
            stop.set()

    work(url, SPEC["name"], stop=stop, on_trial=one_more)  # runs three trials, then stops
    assert _claim_waiting(study) is not None  # a worker that is still running its trial
    return {"url": url, "doc": study_document(url, SPEC["name"])}


def _states(doc: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in doc["trials"]:
        out[t["state"]] = out.get(t["state"], 0) + 1
    return out


def open_in_chromium(html: Path, screenshot: Path, profile: Path) -> dict:
    """Load ``html`` in headless Chromium; console messages, page errors, requests, images, table rows."""
    from playwright.sync_api import sync_playwright

    seen: dict = {"console": [], "page_errors": [], "requests": []}
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            seen["images"] = page.evaluate(
                "Array.from(document.images).map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,"
                " alt: i.alt}))")
            seen["decoded"] = page.evaluate(
                "Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)))")
            seen["rows"] = page.locator("#trials tbody.trials tr[data-trial]").count()
            seen["row_states"] = page.eval_on_selector_all(
                "#trials tbody.trials tr[data-trial]", "rows => rows.map(r => r.className)")
            seen["title"] = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    return seen


@pytest.mark.slow
def test_real_study_figures_match_the_document(real_study):
    doc = real_study["doc"]
    assert doc["schema"] == "rankwise.study/1"
    states = _states(doc)
    assert states["COMPLETE"] == 3 and states["FAIL"] >= 1 and states["RUNNING"] == 1 and states["WAITING"] >= 1
    fail = next(t for t in doc["trials"] if t["state"] == "FAIL")
    assert "worker crashed" in fail["error"]
    done = d.complete(doc)
    n_acc = sum(1 for t in done if d.metric_value(t, "arc_easy") is not None)
    assert n_acc == 3
    # Pareto figure: every COMPLETE trial and the dense model are points
    fig = plots.pareto_plot(doc, "size_reduction", "mean_accuracy")
    ax = fig.axes[0]
    by_gid = {c.get_gid(): c for c in ax.collections}
    drawn = len(by_gid["front"].get_offsets()) + len(by_gid["trials"].get_offsets())
    drawn += sum(1 for line in ax.lines if line.get_gid() == "dense")
    assert drawn == len(done) + 1
    # accuracy figure of each sweep: one point per COMPLETE trial, error bars from the measured stderr
    for sweep in d.sweeps(doc):
        sweep_done = [t for t in d.complete(doc, sweep) if d.metric_value(t, "arc_easy") is not None]
        if not sweep_done:
            continue
        fig = plots.accuracy_vs_size(doc, sweep)
        (container,) = [c for c in fig.axes[0].containers if c.get_label() == "arc_easy acc"]
        assert len(container.lines[0].get_xdata()) == len(sweep_done)
        assert container.has_yerr
        text = caption(fig)
        assert "standard error" in text and "n=8" in text


@pytest.mark.slow
def test_real_study_report_in_headless_chromium(real_study, tmp_path, capsys):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium chromium-driver)")
    doc = real_study["doc"]
    out = tmp_path / "report"
    # straight from the study's storage (rankwise.studies reads it), as a user runs it after a study
    code, _, stderr = run_cli(["report", real_study["url"], "--study", SPEC["name"], "-o", str(out)], capsys)
    assert code in (0, None), stderr
    summary = json.loads((out / "report.json").read_text())
    drawn = [f for f in summary["figures"] if f["files"]]
    assert len(drawn) >= 3

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-real-study.png"
    seen = open_in_chromium(out / "report.html", shot, tmp_path / "chromium-profile")
    shutil.copy2(out / "report.html", ARTIFACTS / "report-real-study.html")
    print(f"\nscreenshot: {shot}\nreport: {ARTIFACTS / 'report-real-study.html'}")

    assert seen["page_errors"] == []
    assert [m for m in seen["console"] if m[0] in ("error", "warning")] == []
    assert all(u.startswith(("file:", "data:")) for u in seen["requests"]), seen["requests"]  # no network
    assert len(seen["images"]) == len(drawn)
    assert all(img["complete"] and img["w"] > 0 and img["h"] > 0 for img in seen["images"]), seen["images"]
    assert all(seen["decoded"])
    assert seen["rows"] == len(doc["trials"])
    for state in ("FAIL", "RUNNING", "WAITING", "COMPLETE"):
        assert f"state-{state}" in seen["row_states"]
    assert shot.stat().st_size > 10_000
    # the exported JSON gives the same report content as the storage
    results = tmp_path / "study.json"
    results.write_text(json.dumps(doc))
    code, _, stderr = run_cli(["report", str(results), "-o", str(tmp_path / "from-json")], capsys)
    assert code in (0, None), stderr
    again = json.loads((tmp_path / "from-json" / "report.json").read_text())
    def settled(rows: list[dict]) -> list[dict]:  # a RUNNING trial's elapsed seconds grow between two reads
        return [{k: v for k, v in r.items() if not (r["state"] == "RUNNING" and k == "seconds")} for r in rows]

    assert settled(again["rows"]) == settled(summary["rows"])
    assert again["best_under_budgets"] == summary["best_under_budgets"]


@pytest.mark.slow
def test_report_of_a_missing_study_is_one_line(real_study, capsys):
    code, _, stderr = run_cli(["report", real_study["url"], "--study", "no-such-study"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")


@pytest.mark.slow
def test_inspect_plot_writes_spectra_figures(tmp_path, capsys):
    out = tmp_path / "spectra"
    # the small bundled encoder (6 layers x 6 roles): same code path as the default model at a tenth of the time
    code, stdout, stderr = run_cli(["inspect", "minilm-l6", "--json", "--plot", str(out)], capsys)
    assert code in (0, None), stderr
    report = json.loads(stdout)
    doc = json.loads((out / "spectra.json").read_text())
    assert len(doc["targets"]) == len(report["targets"]) == 6 * 6
    # the plotted spectra are the ones inspect summarises: same energy ranks for every target
    from rankwise.design.ranks import energy_rank

    for mine, theirs in zip(doc["targets"], report["targets"], strict=True):
        assert (mine["layer"], mine["role"]) == (theirs["layer"], theirs["role"])
        assert energy_rank(mine["singular_values"], 0.90) == theirs["energy_rank_90"]
        assert energy_rank(mine["singular_values"], 0.99) == theirs["energy_rank_99"]
    for name in ("spectra", "cumulative-energy", "energy-ranks"):
        assert (out / f"{name}.png").stat().st_size > 10_000 and (out / f"{name}.svg").exists()
    from rankwise.reports.spectra import spectra_figure

    fig = spectra_figure(doc)
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title().split()[0] for a in panels] == ["q", "k", "v", "o", "up", "down"]
    assert all(len(a.lines) == 6 for a in panels)  # one line per layer
    up0 = next(t for t in doc["targets"] if t["layer"] == 0 and t["role"] == "up")
    assert up0["shape"] == [1536, 384] and len(up0["singular_values"]) == 384
    assert up0["singular_values"] == sorted(up0["singular_values"], reverse=True)


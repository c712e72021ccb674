"""``rankwise report``: a study's trade-off as figures, tables and one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rankwise.cli.main import app


@app.command()
def report(
    source: Annotated[str, typer.Argument(
        help="Exported study results JSON (`rankwise study export --json`) or an Optuna storage URL "
             "(sqlite:///study.db, postgresql://...).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Report folder (default: ./report-STUDY).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name in the storage (needed when it holds several).")] = None,
    spectra: Annotated[bool, typer.Option(
        "--spectra", help="Also load the study's model and plot its singular-value spectra.")] = False,
    pareto: Annotated[list[str] | None, typer.Option(
        "--pareto", help="Extra Pareto front of two objectives X,Y (repeatable), e.g. latency_change,arc_easy; "
                         "objectives: size_reduction, params_ratio, params, bytes, mean_accuracy, latency_change, "
                         "energy_change, decode_ms, or a benchmark name.")] = None,
) -> None:
    """Write report.html (self-contained), report.md, trials.csv, report.json and figures/ (PNG and SVG)."""
    from rankwise.reports import build_report, load_source
    from rankwise.reports.build import parse_pareto

    console = Console(stderr=True)
    doc = load_source(source, study)
    parse_pareto(pareto, doc)  # a typo fails before any model loads or figure is drawn
    spectra_doc = None
    if spectra:
        spectra_doc = _spectra_for(doc, console)
    name = str(doc.get("study") or Path(source).stem or "study")
    folder = out if out is not None else Path(f"report-{name}")
    with console.status("drawing figures"):
        summary = build_report(doc, folder, source=source, spectra_doc=spectra_doc, pareto=pareto)
    counts = ", ".join(f"{n} {s}" for s, n in summary["state_counts"].items()) or "no trials"
    drawn = sum(1 for f in summary["figures"] if f["files"])
    skipped = [f for f in summary["figures"] if not f["files"]]
    typer.echo(f"study {name}: {counts}; {drawn} figures drawn, {len(skipped)} skipped")
    for f in skipped:
        typer.echo(f"  skipped {f['name']}: {f['reason']}")
    for b in summary["best_under_budgets"]:
        value = b["value"]
        shown = "none within budget" if b["trial"] is None else (
            f"trial {b['trial']} ({b['label']}), params kept {100 * b['params_ratio']:.1f}%, {b['metric']} "
            + (f"{100 * value:.1f}%" if b["higher_is_better"] else f"{value:.4g}"))
        typer.echo(f"  best under {100 * b['budget_params_ratio']:.0f}% of parameters: {shown}")
    typer.echo(str(folder / "report.html"))


def _spectra_for(doc: dict, console: Console) -> dict:
    from rankwise.errors import RankwiseError
    from rankwise.models import load
    from rankwise.reports.spectra import model_spectra

    env = doc.get("environment") or {}
    model = env.get("model")
    if not model:
        raise RankwiseError("--spectra: the results do not name their model (environment.model)")
    loaded = load(model, dtype=env.get("dtype") or "float32")
    with console.status(f"spectra of {model}"):
        return model_spectra(loaded.model, loaded.info.name)

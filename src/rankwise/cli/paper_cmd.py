"""``rankwise paper``: the paper's case studies on a bundled model, its report and three headline lines."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rankwise.cli.main import app
from rankwise.devices import DEVICE_HELP
from rankwise.errors import RankwiseError


def _shape(model: str) -> tuple[int, tuple[str, ...]]:
    """Layer count and tensor roles of a model (it is loaded once, then freed, to print the plan)."""
    from rankwise.models import load
    from rankwise.models.adapters import adapter_for

    loaded = load(model)
    adapter = adapter_for(loaded.model)
    return adapter.n_layers, tuple(adapter.roles)


@app.command()
def paper(
    model: Annotated[str, typer.Option("--model", help="Decoder model (bundled alias, folder or hub id).")] =
    "smollm2-135m",
    quick: Annotated[bool, typer.Option("--quick", help="Seeded subsets of a few dozen items, a few points per "
                                                        "sweep (default; the README gives its measured time).")]
    = False,
    standard: Annotated[bool, typer.Option("--standard", help="100 items per task (HellaSwag 50), every "
                                                              "second layer count, 58 points: 1 h 54 min measured on "
                                                              "2 CPU cores.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Complete test sets (GSM8K too) at every point: days on "
                                                      "2 CPU cores; for a GPU.")] = False,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: storage, results JSON, report.")] =
    Path("results/paper"),
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL (default: sqlite:///OUT/"
                                                                  "paper.db); a rerun resumes.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes per study.")] = 1,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    encoder: Annotated[bool, typer.Option("--encoder/--no-encoder", help="Also run the encoder case "
                                                                         "(minilm-l6, STS-B).")] = True,
    plan_only: Annotated[bool, typer.Option("--plan", help="Print the plan and stop.")] = False,
    items: Annotated[int | None, typer.Option("--items", hidden=True, min=1,
                                              help="Items per task (testing: shrinks every subset).")] = None,
    points: Annotated[int | None, typer.Option("--points", hidden=True, min=1,
                                               help="Points per sweep at most (testing).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-trial lines.")] = False,
    doc: Annotated[Path | None, typer.Option("--doc", help="Also write the reproduction document (each claim of "
                                                           "the paper: measured vs paper, verdict) to this .md file, "
                                                           "its JSON and figures in a folder next to it.")] = None,
    from_results: Annotated[bool, typer.Option("--from-results", help="Run nothing: regenerate the --doc "
                                                                      "document from the existing -o DIR.")] = False,
) -> None:
    """Run the paper's case studies (layer-count, layer-removal, rank-sweep, tensor-sensitivity, single-layer,
    layer-density, and the encoder case) as resumable studies; write the HTML report and the results JSON.

    With --doc PATH, also write the reproduction document at the end; `rankwise paper --from-results -o DIR
    --doc PATH` regenerates it from an existing output folder without running anything."""
    from rankwise.cli.study_cmd import _StudyBar, _trial_line
    from rankwise.devices import resolve_device
    from rankwise.paper.plan import ENCODER_MODEL, build_plan, count_points, plan_lines
    from rankwise.paper.run import run_plan
    from rankwise.settings import data_dir

    if sum((quick, standard, full)) > 1:
        raise RankwiseError("choose one of --quick, --standard, --full")
    if workers < 1:
        raise RankwiseError(f"--workers must be 1 or more, got {workers}")
    mode = "standard" if standard else "full" if full else "quick"
    if from_results:
        if doc is None:
            raise RankwiseError("--from-results writes the reproduction document: give --doc PATH")
        from rankwise.paper.reproduction import write_reproduction

        assets = write_reproduction(out, doc, mode=mode if (quick or standard or full) else None)
        typer.echo(f"reproduction document: {doc} (its JSON and figures in {assets})")
        return
    if doc is not None:
        from rankwise.paper.reproduction import check_reproduction_dest

        check_reproduction_dest(doc)  # before the run: a bad --doc must not wait for the end
    console = Console(stderr=True)

    def say(message: str) -> None:
        console.print(message, highlight=False, markup=False, soft_wrap=True)

    def log(message: str) -> None:
        if not quiet:
            say(message)

    device = resolve_device(device)
    n_layers, roles = _shape(model)
    enc_layers = _shape(ENCODER_MODEL)[0] if encoder else None
    threads = max(1, min(8, (os.cpu_count() or 1) // workers))  # the machine's cores, shared by the workers
    plan = build_plan(mode, model, n_layers, roles, data=data_dir(), encoder_layers=enc_layers,
                      items=items, points=points, threads=threads, device=device)
    if not encoder:
        plan.notes.append("encoder case left out (--no-encoder)")
    for s in plan.studies:
        plan.points[s["name"]] = count_points(s, enc_layers if s["model"] == ENCODER_MODEL else n_layers, roles)
    for line in plan_lines(plan):
        say(line)
    if plan_only:
        return

    def bar(url: str, name: str) -> Any:
        return _StudyBar(url, name, console, enabled=not quiet)

    summary = run_plan(plan, out, storage, workers, log=log, line=None if quiet else _trial_line, bar=bar)
    typer.echo("")
    for name, w in summary["studies"].items():
        typer.echo(f"{name}: report {w['report']}, results {w['results']}"
                   + (f" ({w['not_complete']} trial(s) not complete)" if w["not_complete"] else ""))
    typer.echo(f"headlines and plan: {out / 'headlines.json'}; storage {summary['storage']} (a rerun resumes)")
    for line in (summary.get("headlines") or {}).get("lines", []):
        typer.echo(line)
    if summary.get("encoder_line"):
        typer.echo(summary["encoder_line"])
    if summary.get("encoder_skipped"):
        typer.echo(f"encoder case skipped: {summary['encoder_skipped']}")
    if doc is not None:
        from rankwise.paper.reproduction import write_reproduction

        try:
            assets = write_reproduction(out, doc, mode=mode)
        except (RankwiseError, OSError) as exc:
            raise RankwiseError(f"reproduction document not written ({exc}); the results are kept in {out}: "
                                f"rankwise paper --from-results -o {out} --doc PATH writes it") from None
        typer.echo(f"reproduction document: {doc} (its JSON and figures in {assets})")

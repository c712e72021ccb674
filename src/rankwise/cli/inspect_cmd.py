"""``rankwise inspect``: the design space of a model, before any decomposition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from rankwise.analysis import inspect_model
from rankwise.cli.main import app
from rankwise.models import DEFAULT_MODEL, load


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Bundled alias, HF model id, local folder or .gguf file.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: a rankwise "
                                                   "checkpoint's saved dtype, float32 otherwise).")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also write singular-value spectra figures (PNG, SVG) and spectra.json into this folder.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda (cuda:N) or auto (cuda when available).")] = "cpu",
) -> None:
    """Per-target shapes, break-even ranks, energy ranks, stable ranks, and the design-space size."""
    from rankwise.devices import resolve_device

    console = Console(stderr=True)
    loaded = load(model, dtype=dtype, device=resolve_device(device))
    with Progress(TextColumn("spectra"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("spectra", total=None)
        report = inspect_model(loaded.model, loaded.info,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
    if plot is not None:
        _write_plots(loaded, plot, console)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_human(report)
    if plot is not None:
        Console().print(f"spectra figures written to {plot}/ (spectra, cumulative-energy, energy-ranks; PNG and SVG)")


def _write_plots(loaded, folder: Path, console: Console) -> None:
    """``--plot DIR``: the spectra figures of :mod:`rankwise.reports.spectra`, each file written atomically."""
    from rankwise.errors import RankwiseError
    from rankwise.fileio import write_json_atomic
    from rankwise.reports.figures import spectra_figures
    from rankwise.reports.spectra import model_spectra
    from rankwise.reports.style import save_figure

    if folder.exists() and not folder.is_dir():
        raise RankwiseError(f"--plot: {folder} exists and is not a folder")
    with console.status("spectra figures"):
        doc = model_spectra(loaded.model, loaded.info.name)
        for entry in spectra_figures(doc):
            if entry.figure is None:
                raise RankwiseError(f"--plot: cannot draw {entry.name}: {entry.reason}")
            save_figure(entry.figure, folder, entry.name)
        write_json_atomic(folder / "spectra.json", doc)


def _print_human(report: dict) -> None:
    console = Console()
    table = Table(title=f"{report['model']} ({report['architecture']}, {report['adapter']}): "
                        f"{report['n_targets']} targets", show_lines=False)
    for col in ("layer", "role", "shape (out×in)", "params", "r* 2-factor", "r* Tucker",
                "r 90% energy", "r 99% energy", "stable rank"):
        table.add_column(col, justify="right" if col not in ("role",) else "left")
    for t in report["targets"]:
        m, n = t["shape"]
        table.add_row(str(t["layer"]), t["role"], f"{m}×{n}", f"{t['params']:,}", f"{t['break_even_rank']:.1f}",
                      str(t["break_even_rank_three_factor"]), str(t["energy_rank_90"]), str(t["energy_rank_99"]),
                      f"{t['stable_rank']:.2f}")
    console.print(table)
    ds = report["design_space"]
    console.print(
        f"parameters: {report['n_params']:,} in all; {report['target_params']:,} "
        f"({100 * report['target_params_fraction']:.1f}%) in the {report['n_targets']} decomposable targets"
    )
    console.print(
        f"design space (paper: layer subsets × tensor masks × 1 rank, {ds['paper_formula']}): "
        f"{ds['paper']:,} = 2^{ds['paper_log2']:.2f}"
    )
    console.print(
        f"design space (per-target rank, {ds['per_target_formula']}): 2^{ds['per_target_log2']:.1f}"
    )
    console.print("r* 2-factor = m·n/(m+n); r* Tucker = max r with r(m+n)+r² ≤ m·n; "
                  "energy ranks keep that share of Σσ²; stable rank = ‖W‖_F²/‖W‖_2²")

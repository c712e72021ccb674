"""``rankwise study``: run design-space sweeps and searches as resumable, distributed Optuna studies.

``run SPEC`` creates (or resumes) a study and works on it with N workers; ``worker`` joins an existing
study from any machine that reaches its storage; ``status`` shows progress, ETA and failures; ``export``
writes the results document (JSON) or one CSV row per trial.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rankwise.cli.common import on_interrupt
from rankwise.cli.main import app
from rankwise.errors import RankwiseError

study_app = typer.Typer(help="Design-space sweeps and searches on Optuna: run, worker, status, export.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(study_app, name="study")

DEFAULT_STORAGE = "sqlite:///study.db"
NO_TRIAL_NOTE = "no trial was running; completed trials are kept in the storage and a rerun resumes"
StorageOpt = Annotated[str, typer.Option("--storage", help="Optuna storage URL: sqlite:///FILE (default "
                                                           "sqlite:///study.db) or postgresql://USER@HOST/DB.")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Study name (default: the spec's name, else its "
                                                            "file name; status/export: the only study).")]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _trial_line(record: dict[str, Any]) -> str:
    parts = [f"{record.get('sweep')} {record.get('label')}:"]
    for task, m in (record.get("metrics") or {}).items():
        se = f"±{m['stderr']:.3f}" if m.get("stderr") is not None else ""
        parts.append(f"{task} {m['metric']} {_fmt(m['value'])}{se} (n={m['n']})")
    parts.append(f"params {_fmt(record.get('params_ratio'), 3)} of dense")
    eff = record.get("efficiency") or {}
    if eff.get("decode_ms") is not None:
        parts.append(f"decode {eff['decode_ms']:.1f} ms/token")
    parts.append(f"({record.get('seconds', 0):.1f} s)")
    return " ".join(parts)


class _StudyBar:
    """A progress bar with ETA over the whole study (all workers), refreshed from the storage."""

    def __init__(self, storage: str, name: str, console: Console, enabled: bool) -> None:
        self.storage, self.name, self.console, self.enabled = storage, name, console, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Any = None

    def __enter__(self) -> _StudyBar:
        if not self.enabled:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn(f"study {self.name}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task("trials", total=None)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        from rankwise.studies.export import status

        try:
            s = status(self.storage, self.name)
            self._progress.update(self._task, completed=s["done"], total=s["total"])
        except Exception:  # a busy database or a study not created yet: try again at the next tick
            pass

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            self._refresh()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._refresh()
        if self._progress is not None:
            self._progress.stop()


@study_app.command("run")
def run_command(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML).")],
    storage: StorageOpt = DEFAULT_STORAGE,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes (this one plus N-1); 0 only "
                                                           "creates the study and queues its points.")] = 1,
    name: NameOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results document here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Create or resume a study from SPEC and run it to the end (Ctrl-C abandons the current trial cleanly)."""
    from rankwise.studies.engine import StudyInterrupted, check_existing, run_study, study_name_for
    from rankwise.studies.export import write_json
    from rankwise.studies.spec import load_spec
    from rankwise.studies.trial import check_study_data

    console = Console(stderr=True)
    parsed = load_spec(spec)
    study_name = study_name_for(parsed, name)
    log = (lambda m: None) if quiet else (lambda m: console.print(m, highlight=False))
    on_interrupt(NO_TRIAL_NOTE)
    check_existing(parsed, storage, study_name)  # bad storage, foreign spec, missing data: one error line
    check_study_data(parsed)                      # before any bar or model
    try:
        with _StudyBar(storage, study_name, console, enabled=not quiet and workers > 0):
            doc = run_study(parsed, storage, workers, name=study_name, log=log,
                            on_trial=None if quiet else (lambda r: console.print(_trial_line(r), highlight=False)))
    except StudyInterrupted as exc:
        on_interrupt(exc.note)  # the CLI prints "interrupted: <note>" and exits 130
        raise typer.Exit(130) from None
    _summary(doc, console)
    if json_out is not None:
        write_json(str(json_out), doc)
        console.print(f"results document written to {json_out}")


def _summary(doc: dict[str, Any], console: Console) -> None:
    counts: dict[str, int] = {}
    for t in doc["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    text = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "no trials yet"
    console.print(f"study {doc['study']} in {doc['storage']}: {text}", highlight=False)
    if doc.get("pareto_front") is not None:
        console.print(f"Pareto front: trials {doc['pareto_front']}", highlight=False)


@study_app.command("worker")
def worker_command(
    storage: Annotated[str, typer.Option("--storage", help="Storage URL of the study.")],
    name: Annotated[str, typer.Option("--name", help="Study name.")],
    index: Annotated[int, typer.Option("--index", help="Worker index (labels and search seed offset).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    """Join a study and run its trials until none are left."""
    from rankwise.studies.engine import StudyInterrupted, work

    console = Console(stderr=True)
    log = (lambda m: None) if quiet else (lambda m: console.print(m, highlight=False))
    on_interrupt(NO_TRIAL_NOTE)
    try:
        result = work(storage, name, index=index, log=log)
    except StudyInterrupted as exc:
        on_interrupt(exc.note)  # the CLI prints "interrupted: <note>" and exits 130
        raise typer.Exit(130) from None
    if not quiet:
        console.print(f"worker {result.worker}: {len(result.completed)} trial(s) completed, "
                      f"{len(result.failed)} failed", highlight=False)


@study_app.command("status")
def status_command(
    storage: StorageOpt = DEFAULT_STORAGE,
    name: NameOpt = None,
    json_flag: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Counts per state, progress, ETA and failures of a study."""
    import json

    from rankwise.fileio import json_safe
    from rankwise.studies.export import format_eta, status

    s = status(storage, name)
    if json_flag:
        print(json.dumps(json_safe(s), indent=2))
        return
    counts = ", ".join(f"{k.lower()} {v}" for k, v in s["counts"].items() if v)
    pct = 100.0 * s["done"] / s["total"] if s["total"] else 100.0
    print(f"study {s['study']} ({s['kind']}) in {s['storage']}")
    print(f"progress: {s['done']}/{s['total']} points complete ({pct:.0f}%), dense model "
          f"{'measured' if s['dense_done'] else 'not measured yet'}")
    print(f"trials: {counts or 'none'}")
    mean = s["mean_trial_seconds"]
    print(f"mean trial time: {'-' if mean is None else f'{mean:.1f} s'}; running workers: "
          f"{s['running_workers']}; ETA: {format_eta(s['eta_seconds']) if s['done'] < s['total'] else 'done'}")
    for f in s["failures"]:
        print(f"failed trial {f['number']} ({f['label']}): {f['error'] or 'no error recorded'}")


@study_app.command("export")
def export_command(
    storage: StorageOpt = DEFAULT_STORAGE,
    name: NameOpt = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="One row per trial, every metric a column.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="The results document (rankwise.study/1).")]
    = None,
) -> None:
    """Write a study's results: the JSON document and/or a flat CSV."""
    from rankwise.studies.export import study_document, write_csv, write_json

    if csv_out is None and json_out is None:
        raise RankwiseError("export needs --csv FILE and/or --json FILE")
    doc = study_document(storage, name)
    if json_out is not None:
        write_json(str(json_out), doc)
        print(f"{len(doc['trials'])} trials written to {json_out}")
    if csv_out is not None:
        n = write_csv(str(csv_out), doc)
        print(f"{n} rows (dense + {len(doc['trials'])} trials) written to {csv_out}")

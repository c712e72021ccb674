"""Running a paper plan: its studies in one storage, then the report, the results JSON and the headlines.

Output folder layout (``-o DIR``)::

    DIR/paper.db               the Optuna storage (default; a rerun resumes and finishes nothing twice)
    DIR/results.json           the decoder study's results document (rankwise.study/1)
    DIR/report/                its report (report.html, report.md, figures/, trials.csv)
    DIR/encoder-results.json   the encoder study's document, DIR/encoder-report/ its report
    DIR/headlines.json         the three headline lines and the numbers behind them
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError, first_line
from rankwise.fileio import write_json_atomic, write_text_atomic
from rankwise.paper.headlines import encoder_line, headlines
from rankwise.paper.plan import PaperPlan
from rankwise.settings import installed_version
from rankwise.studies.export import format_eta

Log = Callable[[str], None]


def default_storage(out: Path) -> str:
    return f"sqlite:///{out.resolve() / 'paper.db'}"


class EtaPrinter:
    """After the first trial of a run, one line: how long it took and the time projected for the rest."""

    def __init__(self, total: int, done: int, workers: int, log: Log,
                 line: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.total, self.done, self.workers, self.log, self.line = total, done, max(1, workers), log, line
        self.started = time.monotonic()
        self.first_seen = False

    def __call__(self, record: dict[str, Any]) -> None:
        self.done += 1
        if self.line is not None:
            self.log(self.line(record))
        if not self.first_seen:
            self.first_seen = True
            spent = time.monotonic() - self.started
            remaining = max(0, self.total - self.done)
            eta = record.get("seconds", spent) * remaining / self.workers
            finish = time.strftime("%H:%M UTC", time.gmtime(time.time() + eta))
            self.log(f"first trial took {record.get('seconds', spent):.1f} s ({spent:.0f} s with the dense model "
                     f"and set-up); {remaining} point(s) left: estimated {format_eta(eta)} (about {finish})")


#: In a report folder: the stamp of the document and rankwise version the report was built from.
REPORT_STAMP = ".built-from"


def report_stamp(doc: dict[str, Any]) -> str:
    """A hash of the results document and rankwise's version: a rerun of a finished plan whose stamp matches
    the report's skips rebuilding it (about 30 s of figures on one core); any new trial, or another
    rankwise version, rebuilds it."""
    import hashlib
    import json

    from rankwise.fileio import json_safe

    text = json.dumps(json_safe(doc), default=str, allow_nan=False, sort_keys=True)
    return hashlib.sha256(f"{installed_version()}\n{text}".encode()).hexdigest()


def _report_is_current(report: Path, stamp: str) -> bool:
    try:
        return (report / "report.html").is_file() and (report / REPORT_STAMP).read_text().strip() == stamp
    except OSError:
        return False


def run_plan(plan: PaperPlan, out: Path, storage: str | None = None, workers: int = 1, *,
             log: Log = print, line: Callable[[dict[str, Any]], str] | None = None,
             bar: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """Run every study of the plan, write the documents, reports and headlines; returns what was written.

    ``bar(storage, study)`` returns a context manager showing the study's progress (the CLI's bar)."""
    import contextlib

    from rankwise.reports import build_report
    from rankwise.studies import run_study, study_document
    from rankwise.studies.engine import check_existing
    from rankwise.studies.export import status
    from rankwise.studies.spec import load_spec

    out.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(out)
    written: dict[str, Any] = {"storage": storage, "studies": {}}
    for study in plan.studies:
        encoder = study["name"].endswith("-encoder")
        prefix = "encoder-" if encoder else ""
        total = sum(plan.points.get(study["name"], {}).values())
        done = 0
        with contextlib.suppress(Exception):  # a new study has no status yet
            done = status(storage, study["name"])["done"]
        log(f"study {study['name']}: {total} points, {done} already done in {storage}")
        try:
            check_existing(load_spec(study), storage, study["name"])
        except RankwiseError as exc:
            raise RankwiseError(f"{first_line(str(exc)).split(': choose')[0]}: the plan changed since that run "
                                "(mode sizes, threads); use another -o DIR or --storage") from None
        eta = EtaPrinter(total, done, workers, log, line)
        t0 = time.monotonic()
        try:
            with (bar(storage, study["name"]) if bar else contextlib.nullcontext()):
                doc = run_study(study, storage, workers, log=log, on_trial=eta)
        except RankwiseError as exc:
            if not encoder:
                raise
            log(f"encoder case skipped: {exc}")
            written["encoder_skipped"] = str(exc)
            continue
        doc = study_document(storage, study["name"])
        write_json_atomic(out / f"{prefix}results.json", doc)
        report, stamp = out / f"{prefix}report", report_stamp(doc)
        if _report_is_current(report, stamp):
            log(f"{report / 'report.html'} is up to date (built from these results by this rankwise version)")
        else:
            build_report(doc, report, source=f"{prefix}results.json")
            write_text_atomic(report / REPORT_STAMP, stamp + "\n")
        failed = sum(1 for t in doc["trials"] if t["state"] != "COMPLETE")
        written["studies"][study["name"]] = {"results": str(out / f"{prefix}results.json"),
                                             "report": str(report / "report.html"),
                                             "seconds": time.monotonic() - t0, "not_complete": failed}
        if encoder:
            written["encoder_line"] = encoder_line(doc)
        else:
            written["headlines"] = headlines(doc)
    summary = {"schema": "rankwise.paper/1", "mode": plan.mode, "model": plan.model, "notes": plan.notes,
               "points": plan.points, **written}
    write_json_atomic(out / "headlines.json", summary)
    return summary

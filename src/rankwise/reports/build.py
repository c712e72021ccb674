"""Build a study report folder: report.html (self-contained), report.md, trials.csv, report.json, figures/.

The folder is written into a temporary sibling and renamed into place when complete: a crash leaves the
previous report (or none), never half of one. An existing ``out`` that is not a rankwise report is never
replaced (it may be someone's data).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rankwise.checkpoint.output import atomic_folder
from rankwise.errors import RankwiseError
from rankwise.fileio import write_json_atomic, write_text_atomic
from rankwise.reports import document as d
from rankwise.reports import html as html_mod
from rankwise.reports.figures import FigureEntry, study_figures
from rankwise.reports.style import png_bytes, save_figure, tight_boxes
from rankwise.reports.tables import best_under_budgets, columns, fmt, rows, state_counts, to_csv, to_markdown

REPORT_SCHEMA = "rankwise.report/1"
_MARKERS = ("report.json", "report.html")


@contextmanager
def report_folder(out: Path) -> Iterator[Path]:
    """A temp folder written into and swapped onto ``out`` in one step (:func:`rankwise.checkpoint.output.
    atomic_folder`); an existing non-empty folder that is not a report is refused, never replaced."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise RankwiseError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in _MARKERS):
        raise RankwiseError(f"{out} exists, is not empty and is not a rankwise report; choose another -o")
    with atomic_folder(out, RankwiseError) as tmp:
        yield tmp


def _best_summary(best: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b in best:
        t = b["trial"]
        out.append({"budget_params_ratio": b["budget"], "metric": b["metric"],
                    "higher_is_better": b["higher_is_better"], "candidates": b["candidates"],
                    "trial": None if t is None else t.get("number"), "label": None if t is None else t.get("label"),
                    "sweep": None if t is None else t.get("sweep"),
                    "params_ratio": None if t is None else t.get("params_ratio"), "value": b["value"],
                    "dense_value": b["dense_value"]})
    return out


def markdown(doc: dict[str, Any], *, source: str, generated: str, best: list[dict[str, Any]],
             entries: list[FigureEntry], counts: dict[str, int]) -> str:
    env = doc.get("environment") or {}
    cols = columns(doc)
    lines = [f"# rankwise study report: {doc.get('study', 'study')}", "",
             f"model {env.get('model', '?')} · dtype {env.get('dtype', '?')} · device {env.get('device', '?')} · "
             f"source `{source}` · generated {generated}", "",
             "Trials: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "none"), "",
             "## Best points under parameter budgets", "",
             f"| budget (params kept) | trial | label | params kept | {best[0]['metric'] if best else 'metric'} |",
             "|---|---:|---|---:|---:|"]
    for b in best:
        t = b["trial"]
        val = "" if b["value"] is None else (f"{100 * b['value']:.1f}%" if b["higher_is_better"] else f"{b['value']:.4g}")
        if t is None:
            lines.append(f"| ≤ {100 * b['budget']:.0f}% | none | no COMPLETE trial within budget | | |")
        else:
            lines.append(f"| ≤ {100 * b['budget']:.0f}% | {t.get('number')} | {t.get('label') or ''} | "
                         f"{fmt(d.number(t.get('params_ratio')), 'pct')} | {val} |")
    lines += ["", "## Figures", ""]
    for e in entries:
        if e.figure is None:
            lines.append(f"- **{e.title}**: not drawn, {e.reason}")
        else:
            lines.append(f"- **{e.title}**: [{e.files.get('png')}]({e.files.get('png')}) "
                         f"([svg]({e.files.get('svg')}))")
    lines += ["", "## All trials", "", to_markdown(cols, rows(doc)), ""]
    return "\n".join(lines) + "\n"


def parse_pareto(specs: list[str] | None, doc: dict[str, Any]) -> list[tuple[str, str]]:
    """``X,Y`` objective pairs (``size_reduction,arc_easy``), each checked now: a typo is a one-line error."""
    from rankwise.reports.pareto import objective
    from rankwise.reports.plots import metric_kinds

    pairs = []
    for spec in specs or []:
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise RankwiseError(f"--pareto {spec!r}: expected two objectives as X,Y (e.g. size_reduction,arc_easy)")
        for p in parts:
            objective(p, metric_kinds(doc))
        pairs.append((parts[0], parts[1]))
    return pairs


def build_report(doc: dict[str, Any], out: str | Path, *, source: str = "results",
                 spectra_doc: dict[str, Any] | None = None, pareto: list[str] | None = None) -> dict[str, Any]:
    """Write the report folder for a checked study document; returns the report.json content.

    ``pareto``: extra Pareto fronts as ``X,Y`` objective names (see :data:`rankwise.reports.pareto.OBJECTIVES`;
    a benchmark name is an objective too).
    """
    doc = d.check_document(doc, source)
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    entries = study_figures(doc, spectra_doc, parse_pareto(pareto, doc))
    best = best_under_budgets(doc)
    counts = state_counts(doc)
    cols = columns(doc)
    table = rows(doc)
    out = Path(out)
    with report_folder(out) as tmp:
        figures: list[tuple[FigureEntry, bytes | None]] = []
        for e in entries:
            if e.figure is None:
                figures.append((e, None))
                continue
            whole, bare = tight_boxes(e.figure)
            paths = save_figure(e.figure, tmp / "figures", e.name, box=whole)
            e.files = {fmt_name: f"figures/{p.name}" for fmt_name, p in paths.items()}
            figures.append((e, png_bytes(e.figure, with_caption=False, box=bare)))
        page = html_mod.render(doc, source=source, generated=generated, cols=cols, table=table, best=best,
                               figures=figures, counts=counts)
        write_text_atomic(tmp / "report.html", page)
        write_text_atomic(tmp / "report.md", markdown(doc, source=source, generated=generated, best=best,
                                                      entries=entries, counts=counts))
        write_text_atomic(tmp / "trials.csv", to_csv(doc))
        summary = {"schema": REPORT_SCHEMA, "study": doc.get("study"), "source": source, "generated": generated,
                   "environment": doc.get("environment"), "state_counts": counts,
                   "best_under_budgets": _best_summary(best),
                   "figures": [e.to_dict() for e in entries], "columns": [c.key for c in cols], "rows": table}
        write_json_atomic(tmp / "report.json", summary)
    return summary

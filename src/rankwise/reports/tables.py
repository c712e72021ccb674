"""The study's tables: one row per trial (every state), and the best trial under parameter budgets.

One table, three renderings (HTML, Markdown, CSV) built from the same rows, so the files cannot disagree.
Rows of trials that did not complete keep their state and error and show missing numbers as empty, never
as zero.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rankwise.reports import document as d

#: Parameter budgets of the "best points" table: fraction of the dense model's parameters kept.
BUDGETS = (0.90, 0.75, 0.50)


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str = "text"  # text | int | pct | delta (signed pct) | float | score


def columns(doc: dict[str, Any]) -> list[Column]:
    """The summary table's columns: identity, size, every benchmark, mean accuracy, efficiency, time, error."""
    cols = [Column("number", "#", "int"), Column("state", "state"), Column("sweep", "sweep"),
            Column("label", "label"), Column("kind", "kind"), Column("params", "params", "int"),
            Column("params_ratio", "params kept", "pct"), Column("size_reduction", "size reduction", "pct")]
    for name in [*d.benchmarks(doc, "score"), *d.benchmarks(doc, "loss")]:
        metric = d.metric_label(doc, name).removeprefix(name).strip()
        kind = "float" if d.lower_is_better(metric) else "score"
        cols.append(Column(f"metric:{name}", f"{name} {metric}".strip(), kind))
        cols.append(Column(f"stderr:{name}", "± stderr", kind))
    cols.append(Column("mean_accuracy", "mean acc", "score"))
    if d.has_efficiency(doc):
        cols += [Column("efficiency.latency_change", "latency Δ", "delta"),
                 Column("efficiency.ideal_latency_change", "ideal latency Δ", "delta"),
                 Column("efficiency.energy_change", "energy Δ", "delta")]
    cols += [Column("seconds", "seconds", "float"), Column("error", "error")]
    return cols


def cell(trial: dict[str, Any], col: Column) -> Any:
    """The raw value of one cell (None when missing)."""
    if col.key.startswith("stderr:"):
        return d.number((d.metric(trial, col.key[7:]) or {}).get("stderr"))
    if col.kind == "text":
        v = trial.get(col.key)
        return None if v is None else str(v)
    if col.kind == "int":
        v = d.number(trial.get(col.key))
        return None if v is None else int(v)
    return d.value_of(trial, col.key)


def fmt(value: Any, kind: str) -> str:
    """A cell as text: percent for fractions and scores, thousands separators for counts, '' for missing."""
    if value is None:
        return ""
    if kind == "int":
        return f"{value:,}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "delta":
        return f"{100 * value:+.1f}%"
    if kind == "score":
        return f"{100 * value:.1f}"
    if kind == "float":
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def rows(doc: dict[str, Any], include_dense: bool = True) -> list[dict[str, Any]]:
    """Every trial (the dense model first, when present) as {column key: raw value}."""
    cols = columns(doc)
    out = []
    dense = doc.get("dense")
    all_trials = ([{**dense, "number": None, "state": dense.get("state") or "COMPLETE", "label": "dense"}]
                  if include_dense and dense else []) + d.trials(doc)
    for t in all_trials:
        out.append({c.key: cell(t, c) for c in cols})
    return out


def to_csv(doc: dict[str, Any]) -> str:
    """The summary table as CSV with raw values (fractions as fractions), one row per trial plus dense."""
    cols = columns(doc)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.key for c in cols])
    for r in rows(doc):
        w.writerow(["" if r[c.key] is None else r[c.key] for c in cols])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(cols: Sequence[Column], table: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(_md_escape(c.header) for c in cols) + " |",
             "|" + "|".join("---:" if c.kind != "text" else "---" for c in cols) + "|"]
    for r in table:
        lines.append("| " + " | ".join(_md_escape(fmt(r[c.key], c.kind)) for c in cols) + " |")
    return "\n".join(lines)


# --- best points under budgets -----------------------------------------------------------------------------


def best_under_budgets(doc: dict[str, Any], budgets: Sequence[float] = BUDGETS) -> list[dict[str, Any]]:
    """For each budget: the most accurate COMPLETE trial keeping at most that share of the parameters.

    "Most accurate" is the study's headline metric (:func:`rankwise.reports.document.primary`): mean
    accuracy, or the first benchmark when no accuracy was measured (lowest value for perplexities).
    """
    key, label, higher = d.primary(doc)
    out = []
    for budget in budgets:
        cands = [t for t in d.complete(doc)
                 if (r := d.number(t.get("params_ratio"))) is not None and r <= budget
                 and d.value_of(t, key) is not None]
        best = None
        if cands:
            best = max(cands, key=lambda t: (d.value_of(t, key) * (1 if higher else -1),
                                             -(d.number(t.get("params_ratio")) or 0)))
        out.append({"budget": budget, "metric": label, "key": key, "higher_is_better": higher,
                    "candidates": len(cands), "trial": best,
                    "value": d.value_of(best, key) if best else None,
                    "dense_value": d.value_of(doc.get("dense"), key)})
    return out


def state_counts(doc: dict[str, Any]) -> dict[str, int]:
    counts = {s: 0 for s in d.STATES}
    for t in d.trials(doc):
        s = str(t.get("state"))
        counts[s] = counts.get(s, 0) + 1
    return {s: n for s, n in counts.items() if n}

"""The HTML report: one self-contained file (inline CSS, images as base64 data URIs, no script, no network).

It opens from a mail attachment or an offline laptop exactly as it was written: nothing is fetched (even
the favicon is an empty data URI, so browsers do not request one). Every value shown is escaped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape
from typing import Any

from rankwise.reports import document as d
from rankwise.reports.figures import FigureEntry
from rankwise.reports.tables import Column, fmt

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1440px;
     color:#1d2330;line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}
.sub{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.82em;margin:8px 0}
th,td{border:1px solid #d6d9de;padding:3px 7px;vertical-align:top}
th{background:#f1f3f6;text-align:left}
td{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
tr.state-FAIL td{background:#fde8e8}tr.state-RUNNING td{background:#fff6d6}
tr.state-WAITING td{background:#eef0f3;color:#555}tr.state-PRUNED td{background:#f3eefa}
tr.dense td{background:#e9f5ec;font-weight:600}
span.state{font-weight:600;font-size:.85em;padding:1px 5px;border-radius:3px}
span.state-COMPLETE{color:#146c2e}span.state-FAIL{color:#fff;background:#c62828}
span.state-RUNNING{background:#f2c94c}span.state-WAITING{background:#c7ccd4}span.state-PRUNED{background:#cdb8ea}
figure{margin:18px 0;padding:10px;border:1px solid #e2e4e8;border-radius:4px}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#333;white-space:pre-wrap;margin-top:6px}
.skipped{color:#8a4b00}
pre{background:#f6f8fa;padding:10px;font-size:.8em;overflow-x:auto;max-height:420px}
td.err{white-space:normal;color:#a01919;font-size:.9em;word-break:break-word}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _kv_table(items: Sequence[tuple[str, Any]], table_id: str) -> str:
    body = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in items)
    return f'<table id="{table_id}">{body}</table>'


def _environment(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    env = doc.get("environment") or {}
    items = [(k, v) for k, v in env.items() if k != "versions" and v is not None]
    items += [(f"version: {k}", v) for k, v in (env.get("versions") or {}).items()]
    return items


def _row_html(row: dict[str, Any], cols: Sequence[Column], state: str, css: str, number: Any) -> str:
    cells = []
    for c in cols:
        v = row[c.key]
        if c.key == "state":
            cells.append(f'<td><span class="state state-{escape(state)}">{escape(state)}</span></td>')
        else:
            cls = ' class="num"' if c.kind != "text" else ""
            cells.append(f"<td{cls}>{escape(fmt(v, c.kind))}</td>")
    attr = "" if number is None else f' data-trial="{escape(str(number))}"'
    return f'<tr class="{css}"{attr}>' + "".join(cells) + "</tr>"


def trials_table(doc: dict[str, Any], cols: Sequence[Column], table: Sequence[dict[str, Any]]) -> str:
    """The summary table: dense row in its own body, then one row per trial (``tr[data-trial]``) in
    ``tbody.trials``; a trial's error goes in a full-width row under it, so long messages stay readable."""
    cols = [c for c in cols if c.key != "error"]
    head = "<thead><tr>" + "".join(f"<th>{escape(c.header)}</th>" for c in cols) + "</tr></thead>"
    dense_rows, trial_rows = [], []
    offset = 1 if doc.get("dense") and table and table[0].get("label") == "dense" else 0
    if offset:
        dense_rows.append(_row_html(table[0], cols, str(table[0].get("state") or "COMPLETE"), "dense", None))
    for row in table[offset:]:
        state = str(row.get("state") or "UNKNOWN")
        trial_rows.append(_row_html(row, cols, state, f"state-{state}", row.get("number")))
        if row.get("error"):
            text = str(row["error"])
            short = text if len(text) <= 600 else text[:597] + "..."
            trial_rows.append(f'<tr class="state-{escape(state)} error-row"><td></td><td class="err" '
                              f'colspan="{len(cols) - 1}" title="{escape(text)}">error: {escape(short)}</td></tr>')
    return (f'<div class="scroll"><table id="trials">{head}<tbody class="dense">{"".join(dense_rows)}</tbody>'
            f'<tbody class="trials">{"".join(trial_rows)}</tbody></table></div>')


def best_table(best: Sequence[dict[str, Any]]) -> str:
    rows = []
    for b in best:
        t = b["trial"]
        scale = (lambda v: f"{100 * v:.1f}") if b["higher_is_better"] else (lambda v: f"{v:.4g}")
        dense = "" if b["dense_value"] is None else scale(b["dense_value"])
        if t is None:
            rows.append(f"<tr><td>≤ {100 * b['budget']:.0f}%</td><td colspan=5>no COMPLETE trial within this budget "
                        f"({b['candidates']} candidates)</td><td class=num>{dense}</td></tr>")
            continue
        rows.append(
            f"<tr><td>≤ {100 * b['budget']:.0f}%</td><td class=num>{escape(str(t.get('number')))}</td>"
            f"<td>{escape(str(t.get('sweep') or ''))}</td><td>{escape(str(t.get('label') or ''))}</td>"
            f"<td class=num>{fmt(d.number(t.get('params_ratio')), 'pct')}</td>"
            f"<td class=num>{scale(b['value'])}</td><td class=num>{dense}</td></tr>")
    metric = escape(best[0]["metric"]) if best else "metric"
    unit = " (%)" if best and best[0]["higher_is_better"] else ""
    head = (f"<tr><th>parameter budget</th><th>trial</th><th>sweep</th><th>label</th><th>params kept</th>"
            f"<th>{metric}{unit}</th><th>dense {metric}{unit}</th></tr>")
    return f'<table id="best">{head}{"".join(rows)}</table>'


def figure_html(entry: FigureEntry, png: bytes | None) -> str:
    if png is None:
        return (f'<figure class="skipped" id="fig-{escape(entry.name)}"><b>{escape(entry.title)}</b>: not drawn, '
                f"{escape(entry.reason or 'no data')}</figure>")
    links = " · ".join(f'<a href="{escape(p)}">{escape(fmt_name)}</a>' for fmt_name, p in entry.files.items())
    return (f'<figure id="fig-{escape(entry.name)}"><img alt="{escape(entry.title)}" src="{data_uri(png)}">'
            f"<figcaption><b>{escape(entry.title)}</b>{' (' + links + ')' if links else ''}\n"
            f"{escape(entry.caption)}</figcaption></figure>")


def render(doc: dict[str, Any], *, source: str, generated: str, cols: Sequence[Column],
           table: Sequence[dict[str, Any]], best: Sequence[dict[str, Any]],
           figures: Sequence[tuple[FigureEntry, bytes | None]], counts: dict[str, int]) -> str:
    """The whole page as a string."""
    study = str(doc.get("study") or "study")
    env = doc.get("environment") or {}
    count_text = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials yet"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>rankwise report: {escape(study)}</title><style>{_CSS}</style></head><body>",
        f"<h1>rankwise study report: {escape(study)}</h1>",
        f'<p class="sub">model {escape(str(env.get("model", "?")))} · source {escape(source)} · '
        f"generated {escape(generated)} · {len(d.trials(doc))} trials ({escape(count_text)})</p>",
        "<h2>Best points under parameter budgets</h2>",
        '<p class="sub">The most accurate COMPLETE trial keeping at most that share of the dense model\'s '
        "parameters (ties: the smaller model).</p>",
        best_table(best),
        "<h2>Figures</h2>",
        *(figure_html(e, png) for e, png in figures),
        "<h2>All trials</h2>",
        '<p class="sub">Every trial in every state; FAIL, RUNNING, WAITING and PRUNED rows have no (or partial) '
        "numbers. Scores in %, ± one standard error; Δ = change vs dense.</p>",
        trials_table(doc, cols, table),
        "<h2>Environment</h2>",
        _kv_table(_environment(doc), "environment"),
        "<h2>Study spec</h2>",
        f'<pre id="spec">{escape(json.dumps(doc.get("spec"), indent=2, default=str))}</pre>',
        f'<p class="sub">schema {escape(str(doc.get("schema")))} · storage {escape(str(doc.get("storage", "")))}</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"

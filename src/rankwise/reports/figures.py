"""Which figures a study report contains, built from the document: each one drawn, or skipped with a reason.

The registry decides applicability from the data (sweeps, efficiency present, single-target trials,
decomposition reports) so a report of a half-finished or failed study still renders, listing what it
could not draw and why instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from rankwise.reports import document as d
from rankwise.reports import plots, spectra
from rankwise.reports.style import FigureUnavailable, caption
from rankwise.reports.tables import best_under_budgets

#: Sweeps whose trials all remove (nearly) the same share of parameters draw no accuracy-vs-size line.
_FLAT_SPAN = 0.002


@dataclass
class FigureEntry:
    """One figure of the report: drawn (``figure`` set) or skipped (``reason`` set)."""

    name: str
    title: str
    figure: Figure | None = None
    reason: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return caption(self.figure) if self.figure is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "caption": self.caption or None,
                "reason": self.reason, "files": self.files}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def _entry(name: str, title: str, draw: Callable[[], Figure]) -> FigureEntry:
    try:
        return FigureEntry(name, title, figure=draw())
    except FigureUnavailable as exc:
        return FigureEntry(name, title, reason=str(exc))


def n_layers_hint(doc: dict[str, Any], spectra_doc: dict[str, Any] | None = None) -> int | None:
    """The model's layer count when the document or the spectra say it (rank maps and heatmaps span it)."""
    env = doc.get("environment") or {}
    for v in (env.get("n_layers"), (spectra_doc or {}).get("n_layers")):
        if isinstance(v, int) and v > 0:
            return v
    seen = [layer for t in d.trials(doc) for layer, _ in (d.touched_targets(t) or [])]
    seen += [x for t in d.trials(doc) for x in ((t.get("plan") or {}).get("remove_layers") or [])
             if isinstance(x, int)]
    return max(seen) + 1 if seen else None  # at least every layer the study touched


def study_figures(doc: dict[str, Any], spectra_doc: dict[str, Any] | None = None,
                  pareto: list[tuple[str, str]] | None = None) -> list[FigureEntry]:
    """Every figure of a study report, in report order; ``pareto`` adds fronts of (x, y) objective pairs."""
    out: list[FigureEntry] = []
    layers = n_layers_hint(doc, spectra_doc)
    flat: set[str] = set()
    for sweep in d.sweeps(doc):
        done = [t for t in d.complete(doc, sweep) if d.number(t.get("size_reduction")) is not None]
        title = f"Accuracy vs size reduction ({sweep})"
        sizes = [t["size_reduction"] for t in done]
        if len(done) > 1 and max(sizes) - min(sizes) < _FLAT_SPAN:
            flat.add(sweep)
            out.append(FigureEntry(f"accuracy-vs-size-{slug(sweep)}", title, reason=(
                f"every trial of sweep {sweep} removes the same share of parameters "
                f"({100 * sizes[0]:.1f}%); its trials are compared in the sensitivity heatmap and the table")))
            continue
        out.append(_entry(f"accuracy-vs-size-{slug(sweep)}", title,
                          lambda s=sweep: plots.accuracy_vs_size(doc, s)))
    if d.has_efficiency(doc):
        for sweep in d.sweeps(doc):
            if sweep in flat:
                continue
            if any(isinstance(t.get("efficiency"), dict) for t in d.complete(doc, sweep)):
                out.append(_entry(f"efficiency-vs-size-{slug(sweep)}", f"Latency and energy vs size ({sweep})",
                                  lambda s=sweep: plots.efficiency_vs_size(doc, s)))
    else:
        out.append(FigureEntry("efficiency-vs-size", "Latency and energy vs size reduction",
                               reason="the study did not measure efficiency (no trial has an 'efficiency' record)"))
    key, label, _ = d.primary(doc)
    out.append(_entry("pareto-size", f"Pareto front: {label} vs size reduction",
                      lambda: plots.pareto_plot(doc, "size_reduction", key.removeprefix("metric:"))))
    if d.has_efficiency(doc):
        out.append(_entry("pareto-latency", f"Pareto front: {label} vs latency",
                          lambda: plots.pareto_plot(doc, "latency_change", key.removeprefix("metric:"))))
    for x, y in pareto or []:
        out.append(_entry(f"pareto-{slug(y)}-vs-{slug(x)}", f"Pareto front: {y} vs {x}",
                          lambda x=x, y=y: plots.pareto_plot(doc, x, y)))
    out.append(_entry("sensitivity", "Layer × role sensitivity",
                      lambda: plots.sensitivity_heatmap(doc, n_layers=layers)))
    seen: set[Any] = set()
    for best in best_under_budgets(doc):
        t = best["trial"]
        if t is None or t.get("number") in seen or not isinstance(t.get("decomposition"), dict):
            continue
        seen.add(t.get("number"))
        title = (f"Rank map of trial #{t.get('number')} ({t.get('label') or t.get('sweep')}), "
                 f"best under {100 * best['budget']:.0f}% of parameters")
        out.append(_entry(f"rank-map-trial-{t.get('number')}", title,
                          lambda t=t, title=title: plots.rank_map(t["decomposition"], layers, title)))
    if spectra_doc is not None:
        out += spectra_figures(spectra_doc)
    return out


def spectra_figures(spectra_doc: dict[str, Any]) -> list[FigureEntry]:
    return [_entry("spectra", "Singular-value spectra per role", lambda: spectra.spectra_figure(spectra_doc)),
            _entry("cumulative-energy", "Cumulative energy per role", lambda: spectra.energy_figure(spectra_doc)),
            _entry("energy-ranks", "Energy ranks per role across layers",
                   lambda: spectra.energy_rank_figure(spectra_doc))]

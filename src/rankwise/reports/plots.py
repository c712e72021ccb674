"""The trade-off figures of a study: pure functions from the results document (a dict) to a Figure.

Nothing here reads files or touches global matplotlib state, so tests inspect the returned Figure's
artists (lines, points, error bars) against the data before anything is saved. Each figure states its
protocol (benchmarks, subset sizes, what error bars are) in a caption under the axes. A figure the
document has no data for raises :class:`~rankwise.reports.style.FigureUnavailable` with the reason, which
the report prints in the figure's place.

Conventions: sizes are fractions in the document and percent on the axes; "size reduction" is the share
of the *whole model's* parameters removed (as the paper's Fig. 9), accuracies are percent, latency and
energy changes are percent vs the dense model (negative = faster / less energy).
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rankwise.reports import document as d
from rankwise.reports.pareto import Objective, objective, pareto_front
from rankwise.reports.style import FigureUnavailable, new_figure, set_caption

#: Canonical role order (Llama then BERT names); roles outside it follow in first-seen order.
ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")

_DENSE_STYLE = {"color": "black", "marker": "*", "markersize": 11, "linestyle": "none"}


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _title(doc: dict[str, Any], what: str, sweep: str | None = None) -> str:
    model = (doc.get("environment") or {}).get("model") or "model"
    study = doc.get("study") or "study"
    return f"{what}: {model}, study {study}" + (f", sweep {sweep}" if sweep else "")


def _env_line(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    parts = [f"{k} {env[k]}" for k in ("model", "dtype", "device") if env.get(k)]
    return ", ".join(parts)


# --- Fig. 9: accuracy vs size reduction --------------------------------------------------------------------


def accuracy_vs_size(doc: dict[str, Any], sweep: str | None = None,
                     benchmarks: list[str] | None = None) -> Figure:
    """One line per benchmark: score (%) vs size reduction (%), ±1 stderr bars, dense and chance marked."""
    names = benchmarks if benchmarks is not None else d.benchmarks(doc, "score")
    trials = d.complete(doc, sweep)
    series = []
    for name in names:
        pts = []
        for t in trials:
            x, y = d.number(t.get("size_reduction")), d.metric_value(t, name)
            if x is None or y is None:
                continue
            se = d.number((d.metric(t, name) or {}).get("stderr"))
            pts.append((100 * x, 100 * y, 100 * se if se is not None else 0.0, t))
        if pts:
            series.append((name, sorted(pts, key=lambda p: p[0])))
    if not series:
        raise FigureUnavailable("no complete trial with both a size reduction and a score-type benchmark"
                                + (f" in sweep {sweep}" if sweep else ""))
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    dense = doc.get("dense")
    connect = sweep is not None and sweep != "search"  # a sweep is a curve; a search or a mix is a cloud
    for (name, pts), color in zip(series, _colors(len(series)), strict=True):
        xs, ys, es, _ = zip(*pts, strict=True)
        ax.errorbar(xs, ys, yerr=es, fmt="o-" if connect else "o", color=color, capsize=3, markersize=4.5,
                    linewidth=1.4, label=d.metric_label(doc, name), gid=f"series:{name}")
        dv = d.metric_value(dense, name)
        if dv is not None:
            ax.axhline(100 * dv, color=color, linestyle=":", linewidth=1.0, gid=f"dense:{name}")
            ax.plot([0.0], [100 * dv], color=color, marker="*", markersize=10, linestyle="none",
                    gid=f"dense-point:{name}")
        chance = d.number((d.metric(dense, name) or d.metric(pts[0][3], name) or {}).get("chance"))
        if chance is not None:
            ax.axhline(100 * chance, color=color, linestyle="-.", linewidth=0.9, alpha=0.7, gid=f"chance:{name}")
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="black", linestyle=":", marker="*", markersize=8),
                Line2D([], [], color="black", linestyle="-.", linewidth=0.9)]
    labels += ["dense model (0% reduction)", "chance level"]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_xlabel("model size reduction (% of dense parameters removed)")
    ax.set_ylabel("accuracy / score (%)")
    ax.set_xlim(left=min(-1.0, ax.get_xlim()[0]))
    ax.grid(alpha=0.3)
    ax.set_title(_title(doc, "Accuracy vs size reduction", sweep), fontsize=10)
    set_caption(fig, "\n".join([
        "Error bars: ±1 standard error of the benchmark score. Stars and dotted lines: the dense model; "
        "dash-dot lines: chance level. Only COMPLETE trials are plotted.",
        *d.protocols(doc, [n for n, _ in series]),
        _env_line(doc),
    ]))
    return fig


# --- Fig. 10: latency and energy vs size reduction ---------------------------------------------------------


def efficiency_vs_size(doc: dict[str, Any], sweep: str | None = None) -> Figure:
    """Latency (left) and energy (right) reduction vs size reduction: measured points and the ideal model."""
    trials = [t for t in d.complete(doc, sweep) if isinstance(t.get("efficiency"), dict)
              and d.number(t.get("size_reduction")) is not None]
    if not trials:
        raise FigureUnavailable("no complete trial has efficiency measurements" + (f" in sweep {sweep}" if sweep else ""))
    trials.sort(key=lambda t: t["size_reduction"])
    fig = new_figure(10.0, 4.3)
    ax_lat, ax_en = fig.subplots(1, 2)
    notes = []

    def series(field: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for t in trials:
            v = d.number(t["efficiency"].get(field))
            if v is not None:
                xs.append(100 * t["size_reduction"])
                ys.append(-100 * v)
        return xs, ys

    # One ideal for both panels: a memory-bound decode step's time and its energy (DRAM traffic, and static
    # power over that time) both scale with the bytes it reads, so the bytes bound is the ideal of each.
    for ax, what, measured, ideal in ((ax_lat, "latency", "latency_change", "ideal_latency_change"),
                                      (ax_en, "energy", "energy_change", "ideal_latency_change")):
        mx, my = series(measured)
        ix, iy = series(ideal)
        if mx or ix:
            ax.plot([0.0], [0.0], **_DENSE_STYLE, label="dense model", gid=f"dense:{what}")
        if mx:
            ax.plot(mx, my, "o-", color="tab:blue", label=f"measured {what}", gid=f"measured:{what}")
        if ix:
            ax.plot(ix, iy, "s--", color="tab:gray", markersize=4, label=f"ideal {what} (bytes read per token)",
                    gid=f"ideal:{what}")
        ax.set_xlabel("model size reduction (% of dense parameters removed)")
        ax.set_ylabel(f"{what} reduction vs dense (%)")
        ax.grid(alpha=0.3)
        if mx or ix:
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xlim(left=min(-0.5, ax.get_xlim()[0]))
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, frameon=False)
        if not mx:
            reasons = sorted({str(t["efficiency"].get(f"{what}_reason") or "") for t in trials} - {""})
            reason = "; ".join(reasons) or f"no {what} measurement in the results"
            ax.text(0.5, 0.5 if not ix else 0.97, f"{what} not measured:\n" + "\n".join(textwrap.wrap(reason, 48)),
                    transform=ax.transAxes, ha="center", va="center" if not ix else "top", fontsize=8,
                    color="#aa3333", gid=f"absent:{what}")
            if not ix:
                ax.set_xticks([])
                ax.set_yticks([])
            notes.append(f"{what.capitalize()} not measured: {reason}" + ("; the ideal alone is drawn." if ix else "."))
        elif not ix:
            notes.append(f"No ideal {what} model in the results; measured points only.")
    ax_lat.set_title("decode latency", fontsize=10)
    ax_en.set_title("energy", fontsize=10)
    fig.suptitle(_title(doc, "Latency and energy vs size reduction", sweep), fontsize=10)
    protos = sorted({str(t["efficiency"].get("protocol")) for t in trials if t["efficiency"].get("protocol")})
    set_caption(fig, "\n".join([
        "Reduction = −(change vs dense): positive is faster / less energy. Measured: timed (and, where a counter "
        "exists, metered) on the device below; ideal: the bytes one decode step reads, dense vs decomposed (a "
        "memory-bound step's time and energy both scale with them).",
        *(f"Protocol: {p}" for p in protos), *notes, _env_line(doc)]))
    return fig


# --- Pareto front ------------------------------------------------------------------------------------------


def metric_kinds(doc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """benchmark -> (metric name, lower_is_better), for objective labels."""
    out: dict[str, tuple[str, bool]] = {}
    for t in [doc.get("dense") or {}, *d.trials(doc)]:
        for name, m in (t.get("metrics") or {}).items():
            if isinstance(m, dict) and name not in out:
                out[name] = (str(m.get("metric", "")), d.lower_is_better(str(m.get("metric", ""))))
    return out


def pareto_points(doc: dict[str, Any], x: Objective, y: Objective) -> tuple[list[dict[str, Any]], np.ndarray, list[int]]:
    """Complete trials (and the dense model) with both objectives, their values, and the front's indices."""
    dense = doc.get("dense")

    def value(t: dict[str, Any], key: str) -> float | None:
        v = d.value_of(t, key)
        if v is None and t is dense and key.endswith("_change"):
            return 0.0  # the dense model's change vs itself, by definition
        return v

    cands = [t for t in [dense, *d.complete(doc)] if t]
    pts = [(t, value(t, x.key), value(t, y.key)) for t in cands]
    pts = [(t, a, b) for t, a, b in pts if a is not None and b is not None]
    values = np.array([[a, b] for _, a, b in pts], dtype=float).reshape(-1, 2)
    front = pareto_front(values.tolist(), [x.maximize, y.maximize])
    return [t for t, _, _ in pts], values, front


def pareto_plot(doc: dict[str, Any], x: str = "size_reduction", y: str | None = None) -> Figure:
    """All complete trials as points over two objectives; the Pareto front highlighted and labelled."""
    kinds = metric_kinds(doc)
    ox = objective(x, kinds)
    oy = objective(y or d.primary(doc)[0].removeprefix("metric:"), kinds)
    trials, values, front = pareto_points(doc, ox, oy)
    if not trials:
        raise FigureUnavailable(f"no complete trial has both {ox.key} and {oy.key}")
    fig = new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    xs, ys = values[:, 0] * ox.scale, values[:, 1] * oy.scale
    dense_idx = [i for i, t in enumerate(trials) if t is doc.get("dense")]
    others = [i for i in range(len(trials)) if i not in front and i not in dense_idx]
    ax.scatter(xs[others], ys[others], s=22, color="#9aa5b1", label="trial (dominated)" if others else None,
               gid="trials", zorder=2)
    order = sorted(front, key=lambda i: (xs[i], ys[i]))
    ax.plot(xs[order], ys[order], "-", color="tab:red", linewidth=1.2, alpha=0.7, zorder=3)
    marked = [i for i in order if i not in dense_idx]  # the dense model on the front keeps its star
    ax.scatter(xs[marked], ys[marked], s=40, color="tab:red", edgecolor="black", linewidth=0.5,
               label="Pareto front", gid="front", zorder=4)
    if dense_idx:
        i = dense_idx[0]
        ax.plot([xs[i]], [ys[i]], **_DENSE_STYLE, label="dense model", gid="dense", zorder=5)
    spots: dict[tuple[float, float], list[str]] = {}  # front points at the same place share one label
    for i in order:
        t = trials[i]
        name = "dense" if t is doc.get("dense") else str(t.get("label") or f"#{t.get('number')}")
        spots.setdefault((round(float(xs[i]), 6), round(float(ys[i]), 6)), []).append(name)
    if len(spots) <= 15:
        for (px, py), names in spots.items():
            text = ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} +{len(names) - 3}"
            ax.annotate(text, (px, py), textcoords="offset points", xytext=(5, 4), fontsize=7, color="#7a1f1f")
    ax.set_xlabel(ox.label + (" →" if ox.maximize else " (lower is better)"))
    ax.set_ylabel(oy.label)
    ax.margins(0.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(_title(doc, f"Pareto front, {oy.short} vs {ox.short}"), fontsize=10)
    better = f"better = {'higher' if ox.maximize else 'lower'} x and {'higher' if oy.maximize else 'lower'} y"
    bench = [oy.key.removeprefix("metric:")] if oy.key.startswith("metric:") else d.benchmarks(doc, "score")
    set_caption(fig, "\n".join([
        f"{len(trials)} points (COMPLETE trials and the dense model); {len(front)} on the Pareto front ({better}; "
        "a front point is not beaten on both axes by any other point).",
        *d.protocols(doc, bench), _env_line(doc)]))
    return fig


# --- layer x role sensitivity ------------------------------------------------------------------------------


def _role_sort(roles: set[str]) -> list[str]:
    known = [r for r in ROLE_ORDER if r in roles]
    rest = sorted(r for r in roles if r not in ROLE_ORDER and r != "all")
    return [*known, *rest, *(["all"] if "all" in roles else [])]


#: Column of trials that decompose one role in every layer (the tensor-sensitivity preset's ``q@all``).
ALL_LAYERS = -1


def _every_layer(trial: dict[str, Any], layers: set[int], n_layers: int | None) -> bool:
    plans = [trial.get("plan"), (trial.get("decomposition") or {}).get("plan")]
    if any(isinstance(p, dict) and p.get("layers") == "all" for p in plans):
        return True
    return bool(n_layers) and layers == set(range(n_layers or 0))


def sensitivity_cells(doc: dict[str, Any], key: str | None = None, n_layers: int | None = None
                      ) -> tuple[dict[tuple[int, str], tuple[float, dict[str, Any]]], str, bool, int]:
    """(layer, role) -> (metric change vs dense, trial) from trials that decompose one target or one layer.

    A trial that touches several roles of one layer goes in the ``all`` row; one that touches one role in
    every layer goes in the ``all`` column (layer :data:`ALL_LAYERS`). When several trials hit
    the same cell, sweeps named like sensitivity sweeps win, then the later trial; the count of such
    repeats is returned so the caption can say so.
    """
    key, label, higher = (key, key, True) if key else d.primary(doc)
    if key.startswith("metric:"):
        higher = not d.lower_is_better(dict(metric_kinds(doc)).get(key[7:], ("", False))[0])
    base = d.value_of(doc.get("dense"), key)
    if base is None:
        raise FigureUnavailable(f"the dense model has no {label}, so no change can be computed")
    cells: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}
    repeats = 0
    for t in d.complete(doc):
        touched = d.touched_targets(t, n_layers)
        v = d.value_of(t, key)
        if not touched or v is None:
            continue
        layers, roles = {layer for layer, _ in touched}, {role for _, role in touched}
        if len(layers) == 1:
            layer, role = touched[0][0], (touched[0][1] if len(touched) == 1 else "all")
        elif len(roles) == 1 and _every_layer(t, layers, n_layers):
            layer, role = ALL_LAYERS, touched[0][1]
        else:
            continue
        change = 100 * (v - base) if higher else 100 * (v - base) / base
        cell = (layer, role)
        if cell in cells:
            repeats += 1
            old = cells[cell][1]
            if "sensitiv" in str(old.get("sweep")) and "sensitiv" not in str(t.get("sweep")):
                continue
        cells[cell] = (change, t)
    return cells, label, higher, repeats


def sensitivity_heatmap(doc: dict[str, Any], key: str | None = None, n_layers: int | None = None) -> Figure:
    """Roles × layers: change of the study's headline metric when only that target (or layer) is decomposed."""
    cells, label, higher, repeats = sensitivity_cells(doc, key, n_layers)
    if not cells:
        raise FigureUnavailable("no complete trial decomposes exactly one target, one layer, or one role in "
                                "every layer (run a tensor-sensitivity or single-layer sweep)")
    roles = _role_sort({r for _, r in cells})
    n_layers = max(n_layers or 0, 1 + max(layer for layer, _ in cells))
    has_all = any(layer == ALL_LAYERS for layer, _ in cells)
    col = {layer: layer for layer in range(n_layers)} | {ALL_LAYERS: n_layers}
    grid = np.full((len(roles), n_layers + has_all), np.nan)
    for (layer, role), (change, _) in cells.items():
        grid[roles.index(role), col[layer]] = change
    fig = new_figure(min(14.0, max(6.5, 0.36 * grid.shape[1] + 2.5)), max(3.0, 0.42 * len(roles) + 2.0))
    ax = fig.add_subplot()
    lim = float(np.nanmax(np.abs(grid))) or 1.0
    from matplotlib import colormaps

    cmap = colormaps["RdBu" if higher else "RdBu_r"].with_extremes(bad="#e6e6e6")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto",
                   interpolation="nearest", gid="heatmap")
    ax.set_xticks(range(grid.shape[1]), [*map(str, range(n_layers)), *(["all"] if has_all else [])], fontsize=7)
    ax.set_yticks(range(len(roles)), roles, fontsize=8)
    if has_all:
        ax.axvline(n_layers - 0.5, color="black", linewidth=1.2)
    ax.set_xlabel("layer decomposed")
    ax.set_ylabel("role decomposed")
    unit = "percentage points" if higher else "% relative"
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(f"{label} change vs dense ({unit})", fontsize=8)
    if grid.size <= 400:
        for (layer, role), (change, _) in cells.items():
            ax.text(col[layer], roles.index(role), f"{change:+.1f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(change) > 0.6 * lim else "black")
    ax.set_title(_title(doc, "Sensitivity: one target decomposed at a time"), fontsize=10)
    worse = "red = worse (lower)" if higher else "red = worse (higher)"
    bench = [label.split()[0]] if key and key.startswith("metric:") else d.benchmarks(doc, "score")
    set_caption(fig, "\n".join([
        f"Each cell: the {label} of the model with only that (layer, role) decomposed, minus the dense model's "
        f"({unit}); {worse}; grey = not measured; row 'all' = every role of that layer; column 'all' = that role in every layer. {len(cells)} cell(s) measured"
        + (f"; {repeats} cell(s) measured twice: a sensitivity sweep's trial wins, else the later trial."
           if repeats else "."),
        *d.protocols(doc, bench), _env_line(doc)]))
    return fig


# --- per-target rank map -----------------------------------------------------------------------------------


def rank_map(report: dict[str, Any], n_layers: int | None = None, title: str | None = None) -> Figure:
    """Roles × layers of one plan: colour = fraction of the target's parameters kept; text = the rank."""
    targets = [t for t in report.get("targets") or [] if isinstance(t, dict) and "layer" in t and "role" in t]
    if not targets:
        raise FigureUnavailable("the decomposition report lists no targets")
    roles = _role_sort({str(t["role"]) for t in targets})
    n_layers = max(n_layers or 0, 1 + max(int(t["layer"]) for t in targets))
    grid = np.ones((len(roles), n_layers))
    text: dict[tuple[int, int], str] = {}
    for t in targets:
        r, c = roles.index(str(t["role"])), int(t["layer"])
        before, after = d.number(t.get("params_before")), d.number(t.get("params_after"))
        if t.get("kept_dense") or not before:
            text[(r, c)] = "d"
            continue
        grid[r, c] = (after or 0.0) / before
        ranks = t.get("ranks") or []
        text[(r, c)] = str(ranks[0]) if ranks and len(set(ranks)) == 1 else "/".join(map(str, ranks))
    fig = new_figure(min(14.0, max(6.5, 0.36 * n_layers + 2.5)), max(3.0, 0.42 * len(roles) + 2.0))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest", gid="rankmap")
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_yticks(range(len(roles)), roles, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("role")
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("parameters kept (fraction of the dense matrix)", fontsize=8)
    if grid.size <= 400:
        for (r, c), s in text.items():
            ax.text(c, r, s, ha="center", va="center", fontsize=6, color="white" if grid[r, c] < 0.5 else "black")
    summary = report.get("summary") or {}
    red = d.number(summary.get("reduction_pct_of_whole_model"))
    ax.set_title(title or f"Rank map: {report.get('model', 'model')}", fontsize=10)
    method = (report.get("plan") or {}).get("method", "")
    if isinstance(method, dict):  # {name: tucker, solver: ..., ...}
        method = method.get("name", "")
    set_caption(fig, "\n".join([
        "Colour: parameters of the factorized target / parameters of the dense matrix (1 = untouched); text: the "
        "rank kept ('d' = planned but kept dense, above break-even).",
        f"method {method or 'per plan'}, fold {report.get('fold', '?')}"
        + (f"; whole-model parameters removed: {red:.2f}%" if red is not None else "")
        + (f"; {summary.get('targets_decomposed')} targets decomposed" if "targets_decomposed" in summary else "")]))
    return fig


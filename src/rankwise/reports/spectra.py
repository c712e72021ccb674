"""Singular-value spectra of every target weight, and their figures (``rankwise inspect MODEL --plot DIR``).

The spectra are computed with :func:`rankwise.analysis.spectrum.singular_values` (float64 eigenvalues of
the smaller Gram matrix, the same numbers ``rankwise inspect`` summarises), kept as plain lists in a
JSON-safe document so a report can be re-drawn without the model. Three figures:

* normalised spectra σ_i/σ_1 per role, one line per layer (how fast each matrix's spectrum decays);
* cumulative energy Σ_{j≤i} σ_j² / Σ σ² per role, one line per layer (what a rank keeps);
* energy ranks (90% and 99%) as a share of the full rank, per role across layers (where low rank is cheap).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from rankwise.analysis.spectrum import singular_values
from rankwise.design.ranks import energy_rank
from rankwise.models.adapters import adapter_for
from rankwise.reports.plots import ROLE_ORDER
from rankwise.reports.style import FigureUnavailable, new_figure, set_caption

SPECTRA_SCHEMA = "rankwise.spectra/1"


def model_spectra(model: nn.Module, name: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Singular values (descending) of every (layer, role) target, as a JSON-safe document."""
    adapter = adapter_for(model)
    targets = adapter.targets()
    rows = []
    with torch.inference_mode():
        for i, t in enumerate(targets):
            s = singular_values(adapter.linear(t.layer, t.role).weight.detach())
            rows.append({"layer": t.layer, "role": t.role, "shape": [t.out_features, t.in_features],
                         "singular_values": [float(v) for v in s.tolist()]})
            if progress:
                progress(i + 1, len(targets))
    first = next(model.parameters(), None)
    return {"schema": SPECTRA_SCHEMA,
            "model": name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else "",
            "n_layers": adapter.n_layers, "roles": list(adapter.roles), "targets": rows}


def _by_role(spectra: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    roles = list(spectra.get("roles") or [])
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in roles}
    for t in spectra.get("targets") or []:
        if t.get("singular_values"):
            out.setdefault(t["role"], []).append(t)
    out = {r: sorted(ts, key=lambda t: t["layer"]) for r, ts in out.items() if ts}
    if not out:
        raise FigureUnavailable("no singular values in the spectra document")
    order = [r for r in ROLE_ORDER if r in out] + [r for r in out if r not in ROLE_ORDER]
    return {r: out[r] for r in order}


def _panel_grid(fig: Figure, n: int) -> list[Any]:
    cols = 4 if n > 6 else min(n, 3)
    rows = -(-n // cols)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _layer_colors(n_layers: int) -> tuple[Any, Any]:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    return colormaps["viridis"], Normalize(vmin=0, vmax=max(1, n_layers - 1))


def _colorbar(fig: Figure, axes: list[Any], cmap: Any, norm: Any) -> None:
    from matplotlib.cm import ScalarMappable

    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8, pad=0.01)
    cb.set_label("layer")


def _caption_base(spectra: dict[str, Any]) -> str:
    return (f"{spectra.get('model', 'model')} ({spectra.get('dtype', '')}): singular values of each target weight W "
            "(out × in), float64 eigenvalues of the smaller Gram matrix; one line per layer, colour = layer.")


def _role_panels(spectra: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], Figure, list[Any], Any, Any]:
    """The targets grouped by role, a figure with one panel per role, and the layer colour map both spectra
    figures share (so a layer has the same colour in each)."""
    groups = _by_role(spectra)
    n_layers = int(spectra.get("n_layers") or 1 + max(t["layer"] for ts in groups.values() for t in ts))
    cmap, norm = _layer_colors(n_layers)
    fig = new_figure(12.0, 5.6 if len(groups) > 3 else 3.2)
    axes = _panel_grid(fig, len(groups))
    return groups, fig, axes, cmap, norm


def spectra_figure(spectra: dict[str, Any]) -> Figure:
    """Per role: σ_i / σ_1 (log scale) against the index i, one line per layer."""
    groups, fig, axes, cmap, norm = _role_panels(spectra)
    for ax, (role, ts) in zip(axes, groups.items(), strict=True):
        for t in ts:
            s = np.asarray(t["singular_values"], dtype=float)
            ax.semilogy(np.arange(1, s.size + 1), s / s[0] if s[0] > 0 else s, color=cmap(norm(t["layer"])),
                        linewidth=0.9, gid=f"spectrum:{role}:{t['layer']}")
        m, n = ts[0]["shape"]
        ax.set_title(f"{role} ({m}×{n})", fontsize=9)
        ax.set_xlabel("singular value index i", fontsize=8)
        ax.set_ylabel("σ_i / σ_1", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="major")
    _colorbar(fig, axes, cmap, norm)
    fig.suptitle(f"Singular-value spectra per role: {spectra.get('model', 'model')}", fontsize=10)
    set_caption(fig, _caption_base(spectra) + " Normalised by the largest singular value σ_1.")
    return fig


def cumulative_energy(s: np.ndarray) -> np.ndarray:
    """Σ_{j≤i} σ_j² / Σ σ², i = 1..k."""
    e = np.cumsum(s.astype(float) ** 2)
    return e / e[-1] if e.size and e[-1] > 0 else e


def energy_figure(spectra: dict[str, Any]) -> Figure:
    """Per role: cumulative energy against the kept rank as a share of the full rank, one line per layer."""
    groups, fig, axes, cmap, norm = _role_panels(spectra)
    for ax, (role, ts) in zip(axes, groups.items(), strict=True):
        for t in ts:
            s = np.asarray(t["singular_values"], dtype=float)
            ax.plot(100 * np.arange(1, s.size + 1) / s.size, 100 * cumulative_energy(s),
                    color=cmap(norm(t["layer"])), linewidth=0.9, gid=f"energy:{role}:{t['layer']}")
        for level in (90, 99):
            ax.axhline(level, color="black", linestyle="--", linewidth=0.6)
        m, n = ts[0]["shape"]
        ax.set_title(f"{role} ({m}×{n}, full rank {min(m, n)})", fontsize=9)
        ax.set_xlabel("rank kept (% of full rank)", fontsize=8)
        ax.set_ylabel("energy kept (% of Σσ²)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    _colorbar(fig, axes, cmap, norm)
    fig.suptitle(f"Cumulative singular-value energy per role: {spectra.get('model', 'model')}", fontsize=10)
    set_caption(fig, _caption_base(spectra) + " Dashed lines: 90% and 99% of the energy.")
    return fig


def energy_rank_figure(spectra: dict[str, Any]) -> Figure:
    """Ranks holding 90% (left) and 99% (right) of the energy, % of full rank, one line per role across layers."""
    groups = _by_role(spectra)
    fig = new_figure(11.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    from matplotlib import colormaps

    colors = colormaps["tab10"]
    for ax, level in zip(axes, (0.90, 0.99), strict=True):
        for i, (role, ts) in enumerate(groups.items()):
            layers = [t["layer"] for t in ts]
            vals = [100 * energy_rank(t["singular_values"], level) / len(t["singular_values"]) for t in ts]
            ax.plot(layers, vals, "-o", markersize=2.5, color=colors(i % 10), linewidth=1.1,
                    label=role if level == 0.90 else None, gid=f"erank{round(level * 100)}:{role}")
        ax.set_title(f"rank holding {level:.0%} of the energy", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("energy rank (% of full rank min(m, n))")
    fig.legend(loc="outside right center", fontsize=8, title="role", title_fontsize=8)
    fig.suptitle(f"Energy ranks per role across layers: {spectra.get('model', 'model')}", fontsize=10)
    set_caption(fig, _caption_base(spectra).replace("; one line per layer, colour = layer.", ".")
                + " Energy rank: smallest r whose top-r singular values hold that share of Σσ² "
                "(as `rankwise inspect` reports); one line per role.")
    return fig

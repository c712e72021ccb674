"""The decision policy: which form and which factor layouts to execute, from micro-benchmark timings.

Pure functions of measurements (plus :func:`shape_layouts`, which asks :mod:`~rankwise.efficiency.microbench`
for the timings it decides on), so the rules can be tested on hand-made timings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankwise.efficiency.microbench import (
    FORMS,
    LAYOUTS,
    FormTiming,
    TimingCache,
    benchmark_matrix,
    shape_forms,
)
from rankwise.layers.factorized import FactorizedShape, Layout


def choose_layout(timings: dict[int, dict[str, FormTiming]], margin: float = 0.03) -> Layout:
    """``col`` when it beats ``row`` by more than ``margin`` at some token count and is slower at none by more
    than the measurement resolves (the larger of ``margin`` and the blocks' median/min spread); else ``row``."""
    never_slower, faster = True, False
    for row in timings.values():
        ratio = row["col"].min_us / row["row"].min_us
        noise = max(row[lay].median_us / row[lay].min_us - 1.0 for lay in LAYOUTS)
        never_slower = never_slower and ratio <= 1.0 + max(margin, noise)
        faster = faster or ratio < 1.0 - margin
    return "col" if never_slower and faster else "row"


def shape_layouts(shape: FactorizedShape, token_counts: Sequence[int], device: torch.device, dtype: torch.dtype,
                  cache: TimingCache | None = None, blocks: int = 7, remeasure: bool = False,
                  margin: float = 0.03) -> dict[str, dict[str, Layout]]:
    """The measured best layout of every factor of every factorized candidate form of ``shape``.

    The forms share factor matrices (both forms of a Tucker shape have the same ``first``): each distinct
    matrix is measured once, also when no timing cache is used.
    """
    chosen: dict[tuple[int, int], Layout] = {}
    out: dict[str, dict[str, Layout]] = {}
    for form, fs in shape_forms(shape).items():
        if fs is None:
            continue
        out[form] = {}
        for name, (o, i) in fs.factor_shapes.items():
            if (o, i) not in chosen:
                timings = benchmark_matrix(o, i, token_counts, device, dtype, cache, blocks, remeasure)
                chosen[o, i] = choose_layout(timings, margin)
            out[form][name] = chosen[o, i]
    return out


def choose_form(timings: dict[int, dict[str, FormTiming]], margin: float = 0.03,
                params: dict[str, int] | None = None) -> tuple[str, dict[str, float], float]:
    """The form to execute: (form, worst-case time ratio to dense per form, the noise allowance used).

    Among the factorized forms, the one with the lowest worst-case ratio (over token counts) of its time to
    dense time wins, and among forms within ``margin`` of that, the one with the fewest ``params``. It is
    kept unless dense beats it somewhere by more than the larger of ``margin`` and the measurement's own
    noise there (median/min - 1 of the blocks). Within the noise the form with fewer bytes is kept: the
    end-to-end guard is what settles the whole model.
    """
    forms = [f for f in next(iter(timings.values())) if f != "dense"]
    scores = {f: max(timings[t][f].min_us / timings[t]["dense"].min_us for t in timings) for f in forms}
    scores["dense"] = 1.0
    if not forms:
        return "dense", scores, margin
    fastest = min(scores[f] for f in forms)
    close = [f for f in forms if scores[f] <= fastest * (1.0 + margin)]
    best = min(close, key=lambda f: ((params or {}).get(f, 0), scores[f], FORMS.index(f)))
    allowance = margin
    for row in timings.values():
        noise = max(row[f].median_us / row[f].min_us - 1.0 for f in (best, "dense"))
        allowance_t = max(margin, noise)
        allowance = max(allowance, allowance_t)
        if row[best].min_us / row["dense"].min_us > 1.0 + allowance_t:
            return "dense", scores, allowance_t
    return best, scores, allowance


def form_params(shape: FactorizedShape) -> dict[str, int]:
    """Parameters of each candidate form of ``shape``."""
    dense = shape.in_features * shape.out_features + (shape.out_features if shape.bias else 0)
    return {f: (s.params if s is not None else dense) for f, s in shape_forms(shape).items()}


def _describe(form: str, scores: dict[str, float], timings: dict[int, dict[str, FormTiming]],
              allowance: float, layouts: dict[str, Layout] | None = None) -> str:
    if form == "dense":
        worst = ", ".join(f"{f} up to {s:.2f}x dense time" for f, s in scores.items() if f != "dense")
        return f"dense: faster beyond noise ({100 * allowance:.0f}%) ({worst})"
    speed = ", ".join(f"{timings[t]['dense'].min_us / timings[t][form].min_us:.2f}x@{t}" for t in timings)
    lay = "" if not layouts else "; layouts " + "/".join(f"{k}:{v}" for k, v in layouts.items())
    return f"{form}: {speed} vs dense (worst-case time ratio {scores[form]:.2f}; block noise up to " \
           f"{100 * allowance:.0f}%{lay})"

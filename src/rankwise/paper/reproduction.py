"""``docs/paper-reproduction.md`` from a paper run's output folder: each claim of the paper, what rankwise
measured for it, the paper's Llama-2-7B numbers where it gives them, and a verdict.

:func:`reproduction_markdown` is pure: it reads ``results.json``, ``encoder-results.json`` and
``headlines.json`` of an output folder (see :mod:`rankwise.paper.run`) and returns the document; every
number printed comes from those files (trial numbers are printed so each row can be found there). A sweep
or trial that is missing is said to be missing. :func:`write_reproduction` writes the document atomically
and copies the JSON files and the figures it references into a folder next to it (``NAME/`` for
``NAME.md``), so the document can be committed with what it was made from.

Verdicts. A difference between two measurements has the standard error sqrt(se_a^2 + se_b^2): the two are
treated as independent, which overstates it (both are measured on the same items), so the verdicts are
conservative. A directional claim (X is lower than Y) *holds* when the difference has the claimed sign and
exceeds 2 standard errors, *does not hold* when it has the other sign beyond 2 standard errors, and is
*inconclusive* within 2 standard errors. A claim that two things are about equal (rank 1 is as good as
larger ranks; rank 1 on all tensors is about as bad as removal) *does not hold* when they differ beyond
2 standard errors, *holds* when they are within 2 standard errors and that 2-standard-error interval also
rules out a difference over :data:`EQUIVALENCE_MARGIN`, and is *inconclusive* otherwise (too noisy to tell).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError
from rankwise.fileio import atomic_path, check_output_path, write_text_atomic
from rankwise.paper.headlines import (
    DENSE_DRIFT_LIMIT,
    TARGET_REDUCTION,
    acc_stderr,
    dense_timing_drift,
    headlines,
    mean_accuracy_with_stderr,
    nine_percent_point,
)
from rankwise.paper.plan import task_items

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
#: A claim of equality holds only if the 2-standard-error interval of the difference lies within this.
EQUIVALENCE_MARGIN = 0.02
PAPER_MODEL = "Llama-2-7B"
#: The paper's values at its 9%-size point (rank 1 on all 7 tensors of layers 2, 17, 31), in percent.
#: It reports TruthfulQA once without saying MC1 or MC2; the value is shown against both.
PAPER_NINE_PERCENT = {"arc_easy": 66.2, "arc_challenge": 36.4, "hellaswag": 49.9, "mmlu": 35.8,
                      "truthfulqa_mc1": 30.7, "truthfulqa_mc2": 30.7, "winogrande": 61.9, "gsm8k": 2.6}
PAPER_LOSS_POINTS = (4.0, 10.0)
PAPER_LATENCY = (-0.054, -0.021)
PAPER_ENERGY = (-0.062, -0.036)
TASK_NAMES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag", "mmlu": "MMLU",
              "truthfulqa_mc1": "TruthfulQA MC1", "truthfulqa_mc2": "TruthfulQA MC2", "winogrande": "WinoGrande",
              "gsm8k": "GSM8K", "wikitext": "WikiText-2", "stsb": "STS-B"}
FULL_TIME = "--full runs every test set at every point; on 2 CPU cores that takes days."
DEFAULT_MODEL = "smollm2-135m"
#: The reasons every section gives; the first two only for the default model (the bundled one they describe).
WHY_DEFAULT_MODEL = [
    "model size: the bundled decoder has 135M parameters and 30 layers, the paper's Llama-2-7B 7B and 32; a small "
    "model has less redundancy per layer, so the same rank cut can cost it more",
    "the bundled weights come from a quantized GGUF (Q4_1, dequantized), not the original half-precision weights",
]
WHY_COMMON = [
    "subset sizes: seeded samples of a few dozen (quick) or 100 (standard; HellaSwag 50) items per task, so standard "
    "errors are several points; the paper uses the whole test sets",
]

Figure = tuple[Path, str]  # (source file, path relative to the assets folder)


# --------------------------------------------------------------------------------------------- reading
def _load(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise RankwiseError(f"{path} not found: give the output folder of a 'rankwise paper' run (-o DIR)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RankwiseError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RankwiseError(f"{path} is not a JSON object")
    return data


def _complete(doc: dict[str, Any] | None, sweep: str) -> list[dict[str, Any]]:
    return [t for t in (doc or {}).get("trials", []) if t.get("state") == "COMPLETE" and t.get("sweep") == sweep]


# --------------------------------------------------------------------------------------------- formatting
def _pts(value: float | None, se: float | None = None) -> str:
    """An accuracy in percent (points), with its standard error."""
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * value:.1f} (stderr n/a)"


def _signed_pts(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f} ± {100 * se:.1f}" if se is not None else f"{100 * value:+.1f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _size(trial: dict[str, Any]) -> str:
    r = trial.get("size_reduction")
    return "n/a" if r is None else f"{-100 * r:+.1f}%"


def _combined(*ses: float | None) -> float | None:
    return None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses))  # type: ignore[operator]


def _group_mean(values: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    """Mean of independent measurements and its standard error."""
    k = len(values)
    ses = [s for _, s in values]
    se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / k  # type: ignore[operator]
    return sum(v for v, _ in values) / k, se


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _trial_ref(t: dict[str, Any]) -> str:
    return "dense" if t.get("number") is None else f"#{t['number']}"


def _perplexity(record: dict[str, Any]) -> str:
    m = (record.get("metrics") or {}).get("wikitext") or {}
    if m.get("value") is None:
        return "n/a"
    se = m.get("stderr")
    return f"{m['value']:.2f}" + (f" ± {se:.2f}" if se is not None else "")


# --------------------------------------------------------------------------------------------- verdicts
def directional_verdict(diff: float | None, se: float | None, sign: int) -> str:
    """``holds`` when ``diff`` has the sign ``sign`` (-1 or +1) beyond 2 standard errors, ``does not hold``
    when it has the other sign beyond them, ``inconclusive`` within them (or without a standard error)."""
    if diff is None or se is None or abs(diff) <= 2 * se:
        return UNSURE
    return HOLDS if diff * sign > 0 else FAILS


def equivalence_verdict(diff: float | None, se: float | None, margin: float = EQUIVALENCE_MARGIN) -> str:
    """For a claim that two values are about equal: ``does not hold`` beyond 2 standard errors, ``holds``
    when the 2-standard-error interval lies within ±``margin``, ``inconclusive`` otherwise."""
    if diff is None or se is None:
        return UNSURE
    if abs(diff) > 2 * se:
        return FAILS
    return HOLDS if abs(diff) + 2 * se <= margin else UNSURE


def _verdict_line(verdict: str, why: str) -> str:
    return f"**Verdict: {verdict}.** {why}"




# --------------------------------------------------------------------------------------------- sections
class _Doc:
    """Builds the markdown and collects the figures it references."""

    def __init__(self, out_dir: Path, assets: str, model: str, mode: str) -> None:
        self.out_dir, self.assets = out_dir, assets
        self.lines: list[str] = []
        self.figures: list[Figure] = []
        self.reasons = (WHY_DEFAULT_MODEL if model == DEFAULT_MODEL else [
            f"model size: {model} against the paper's {PAPER_MODEL}; a smaller model has less redundancy per "
            "layer, so the same rank cut can cost it more"]) + (WHY_COMMON if mode != "full" else [])

    def why(self, *specific: str) -> list[str]:
        """The section's "why it might differ": its own reasons, then a pointer to those every section shares
        (listed once, in the header)."""
        return ["Why it might differ from the paper:", "", *(f"- {s}" for s in specific),
                "- the differences from the paper's setup listed under \"How it was produced\"", ""]

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, report: str, name: str, title: str) -> None:
        """Reference ``OUT/report/figures/name.png`` (and its SVG) when the report drew it; else say so."""
        folder = self.out_dir / report / "figures"
        png, svg = folder / f"{name}.png", folder / f"{name}.svg"
        sub = "figures" if report == "report" else f"{report.removesuffix('-report')}-figures"
        if not png.is_file():
            self.add(f"_Figure '{title}': not drawn by the run's report ({report}/figures/{name}.png is missing)._",
                     "")
            return
        self.figures.append((png, f"{sub}/{png.name}"))
        link = f"![{title}]({self.assets}/{sub}/{png.name})"
        if svg.is_file():
            self.figures.append((svg, f"{sub}/{svg.name}"))
            link += f" ([SVG]({self.assets}/{sub}/{svg.name}))"
        self.add(link, "")


def _missing(d: _Doc, sweep: str, doc: dict[str, Any]) -> None:
    others = [t for t in doc.get("trials", []) if t.get("sweep") == sweep]
    why = (f"its {len(others)} trial(s) did not complete ("
           + ", ".join(f"#{t.get('number')} {t.get('state')}" for t in others) + ")") if others else \
        "the run has no trial of it"
    d.add(f"No completed trial of the `{sweep}` sweep: {why}.", "", _verdict_line(UNSURE, "Nothing to compare."), "")


def _n_layers(doc: dict[str, Any]) -> int | None:
    env = doc.get("environment") or {}
    if isinstance(env.get("n_layers"), int):
        return env["n_layers"]
    seen: list[int] = []
    for t in doc.get("trials", []):
        layers = (t.get("plan") or {}).get("layers")
        if isinstance(layers, list):
            seen += [x for x in layers if isinstance(x, int)]
        if t.get("sweep") == "single-layer" and isinstance(t.get("x"), int):
            seen.append(t["x"])
    return max(seen) + 1 if seen else None


def _claim_rank(d: _Doc, doc: dict[str, Any]) -> None:
    d.add("## a. Ranks can be cut to 1", "",
          "Paper: on the same layers, rank 1 (Tucker) costs about as much accuracy as larger ranks while removing "
          f"the most parameters, so the rank can be cut to 1. The paper shows this as a figure on {PAPER_MODEL}; no "
          "number of it is compared here. Measured: the `rank-sweep` sweep (the same layers at each rank).", "")
    trials = _complete(doc, "rank-sweep")
    if not trials:
        _missing(d, "rank-sweep", doc)
        return
    trials.sort(key=lambda t: -(t.get("size_reduction") or 0))
    layers = (trials[0].get("plan") or {}).get("layers")
    rows, means = [], {}
    for t in trials:
        m, se, _ = mean_accuracy_with_stderr(t)
        means[t.get("x")] = (m, se, t)
        rows.append([_trial_ref(t), str(t.get("label")), _size(t), _pts(m, se), _perplexity(t)])
    d.add(f"Layers {layers}, all tensors; mean accuracy in points (protocol above).", "")
    d.add(*_table(["trial", "rank", "size change", "mean acc (%)", "WikiText-2 token ppl"], rows))
    rank1 = means.get(1)
    larger = [(m, se, t) for x, (m, se, t) in means.items() if x != 1 and m is not None]
    if rank1 is None or rank1[0] is None or not larger:
        d.add(_verdict_line(UNSURE, "Needs rank 1 and at least one larger rank completed."), "")
    else:
        best = max(larger, key=lambda v: v[0])
        diff, se = rank1[0] - best[0], _combined(rank1[1], best[1])
        verdict = equivalence_verdict(diff, se)
        d.add(_verdict_line(verdict, f"Rank 1 minus the best larger rank ({best[2].get('label')}): "
                                     f"{_signed_pts(diff, se)} points; the claim is that the two are about equal "
                                     f"(holds only if the 2-standard-error interval is within ±"
                                     f"{100 * EQUIVALENCE_MARGIN:.0f} points)."), "")
    d.figure("report", "accuracy-vs-size-rank-sweep", "Accuracy vs size reduction (rank-sweep)")
    d.add(*d.why("the same number of layers is a larger share of a small model's layers than of Llama-2-7B's 32"))


def _claim_early(d: _Doc, doc: dict[str, Any], dense_mean: float | None, dense_se: float | None) -> None:
    d.add("## b. Early layers are sensitive", "",
          "Paper: decomposing one of the first layers costs more accuracy than decomposing a later one (a figure on "
          f"{PAPER_MODEL}; no number of it is compared here). Measured: the `single-layer` sweep, rank 1 on all "
          "tensors of one layer at a time.", "")
    trials = sorted(_complete(doc, "single-layer"), key=lambda t: (t.get("x") is None, t.get("x") or 0))
    if not trials:
        _missing(d, "single-layer", doc)
        return
    n_layers = _n_layers(doc)
    rows, early, late = [], [], []
    cut = max(1, (n_layers or 4) // 4)
    for t in trials:
        m, se, _ = mean_accuracy_with_stderr(t)
        change = None if m is None or dense_mean is None else m - dense_mean
        rows.append([_trial_ref(t), str(t.get("x")), _pts(m, se), _signed_pts(change, _combined(se, dense_se)),
                     _perplexity(t)])
        if m is not None and isinstance(t.get("x"), int):
            (early if t["x"] < cut else late).append((m, se))
    d.add(*_table(["trial", "layer", "mean acc (%)", "change vs dense (points)", "WikiText-2 token ppl"], rows))
    if not early or not late:
        d.add(_verdict_line(UNSURE, f"Needs layers below {cut} (early: the first quarter of {n_layers} layers) and "
                                    "later layers, both completed."), "")
    else:
        (e, e_se), (la, la_se) = _group_mean(early), _group_mean(late)
        diff, se = e - la, _combined(e_se, la_se)
        verdict = directional_verdict(diff, se, -1)
        d.add(_verdict_line(verdict, f"Early layers (index < {cut}, the first quarter of {n_layers}) mean "
                                     f"{_pts(e, e_se)} vs later layers {_pts(la, la_se)}: difference "
                                     f"{_signed_pts(diff, se)} points (the claim: negative)."), "")
    d.figure("report", "sensitivity", "Layer × role sensitivity")
    measured = len({t.get("x") for t in trials})
    d.add(*d.why(*([f"only {measured} of the {n_layers} layers were measured"] if n_layers and measured < n_layers
                   else [])))


def _claim_adjacent(d: _Doc, doc: dict[str, Any]) -> None:
    d.add("## c. Adjacent layers are sensitive", "",
          "Paper: the same number of decomposed layers costs more when they are adjacent than when they are spread "
          f"out (a figure on {PAPER_MODEL}; no number of it is compared here). Measured: the `layer-density` sweep, "
          "the same count of layers, spacing from wide to 1.", "")
    trials = sorted(_complete(doc, "layer-density"), key=lambda t: -(t.get("x") or 0))
    if not trials:
        _missing(d, "layer-density", doc)
        return
    rows, by_spacing = [], {}
    for t in trials:
        m, se, _ = mean_accuracy_with_stderr(t)
        by_spacing[t.get("x")] = (m, se)
        rows.append([_trial_ref(t), str(t.get("x")), str((t.get("plan") or {}).get("layers")), _size(t),
                     _pts(m, se), _perplexity(t)])
    d.add(*_table(["trial", "spacing", "layers", "size change", "mean acc (%)", "WikiText-2 token ppl"], rows))
    spacings = [s for s, (m, _) in by_spacing.items() if isinstance(s, int) and m is not None]
    if len(spacings) < 2:
        d.add(_verdict_line(UNSURE, "Needs at least two spacings completed."), "")
    else:
        narrow, wide = by_spacing[min(spacings)], by_spacing[max(spacings)]
        diff, se = narrow[0] - wide[0], _combined(narrow[1], wide[1])  # type: ignore[operator]
        verdict = directional_verdict(diff, se, -1)
        d.add(_verdict_line(verdict, f"Spacing {min(spacings)} minus spacing {max(spacings)}: "
                                     f"{_signed_pts(diff, se)} points (the claim: negative)."), "")
    d.add(*d.why("the layers at each spacing differ too (they are centred in the model), so layer position and "
                "adjacency are not fully separated"))


def _claim_nine(d: _Doc, doc: dict[str, Any], numbers: dict[str, Any]) -> None:
    lo, hi = PAPER_LOSS_POINTS
    d.add("## d. The 9%-size point costs 4-10 accuracy points", "",
          f"Paper: rank 1 on all 7 tensors of layers 2, 17 and 31 of {PAPER_MODEL} removes about 9% of the "
          f"parameters and costs {lo:.0f}-{hi:.0f} accuracy points per task against the dense model. Measured: the "
          f"`layer-count` trial whose size reduction is nearest {100 * TARGET_REDUCTION:.0f}%.", "")
    point = nine_percent_point(doc)
    dense = doc.get("dense") or {}
    if point is None:
        _missing(d, "layer-count", doc)
        return
    d.add(f"Point: trial {_trial_ref(point)}, {point.get('label')}, layers "
          f"{(point.get('plan') or {}).get('layers')}, size change {_size(point)}.", "")
    rows = []
    dense_metrics = dense.get("metrics") or {}
    point_metrics = point.get("metrics") or {}
    for task in dict.fromkeys([*dense_metrics, *point_metrics]):
        a, b = dense_metrics.get(task) or {}, point_metrics.get(task) or {}
        metric = a.get("metric") or b.get("metric")
        paper = PAPER_NINE_PERCENT.get(task)
        paper_text = "n/a" if paper is None else f"{paper:.1f}" + ("*" if task.startswith("truthfulqa") else "")
        n = a.get("n") if a.get("n") == b.get("n") else f"{a.get('n')}/{b.get('n')}"
        if metric == "token_perplexity":
            change = (None if a.get("value") is None or b.get("value") is None else b["value"] / a["value"] - 1)
            rows.append([TASK_NAMES.get(task, task), "token-level perplexity (lower is better)",
                         _perplexity(dense), _perplexity(point), _pct(change), str(n), "n/a"])
            continue
        change = None if a.get("value") is None or b.get("value") is None else b["value"] - a["value"]
        a_se, b_se = acc_stderr(a), acc_stderr(b)  # MMLU's group has none: binomial from n and p
        rows.append([TASK_NAMES.get(task, task), str(metric), _pts(a.get("value"), a_se), _pts(b.get("value"), b_se),
                     _signed_pts(change, _combined(a_se, b_se)), str(n), paper_text])
    nine = numbers.get("nine_percent") or {}
    rows.append(["**mean accuracy**", "acc", _pts(numbers.get("dense_mean_accuracy"), numbers.get("dense_stderr")),
                 _pts(nine.get("mean_accuracy"), nine.get("stderr")),
                 _signed_pts(nine.get("change"), _combined(numbers.get("dense_stderr"), nine.get("stderr"))), "",
                 ""])
    d.add(*_table(["task", "metric", "dense (%)", "at the point (%)", "change (points)", "n items",
                   f"paper at its 9% point ({PAPER_MODEL}, %)"], rows))
    d.add("\\* the paper reports one TruthfulQA number without saying MC1 or MC2. Accuracy is `acc` (not "
          "`acc_norm`); perplexity is token-level. Missing tasks were not in this run (see the last section).", "")
    change, se = nine.get("change"), _combined(numbers.get("dense_stderr"), nine.get("stderr"))
    if change is None or se is None:
        d.add(_verdict_line(UNSURE, "No mean accuracy change with a standard error at this point."), "")
    else:
        loss = -100 * change
        if lo <= loss <= hi and loss > 200 * se:
            verdict = HOLDS
        elif loss + 200 * se < lo or loss - 200 * se > hi:
            verdict = FAILS
        else:
            verdict = UNSURE
        d.add(_verdict_line(verdict, f"Mean loss {loss:.1f} ± {100 * se:.1f} points. Holds when the loss is within "
                                     f"{lo:.0f}-{hi:.0f} points and more than 2 standard errors above 0; does not "
                                     "hold when its 2-standard-error interval lies outside that range."), "")
    d.figure("report", "accuracy-vs-size-layer-count", "Accuracy vs size reduction (layer-count)")
    d.add(*d.why("9% of a small model's parameters includes a larger share of embeddings, which are never decomposed, "
                "so more layers must be decomposed to reach it"))


def _claim_latency(d: _Doc, doc: dict[str, Any]) -> None:
    d.add("## e. Latency and energy fall with size", "",
          f"Paper ({PAPER_MODEL}, GPU): decode latency {_pct(PAPER_LATENCY[1])} to {_pct(PAPER_LATENCY[0])}, energy "
          f"{_pct(PAPER_ENERGY[1])} to {_pct(PAPER_ENERGY[0])} over its layer-count points. Measured: decode latency "
          "of each `layer-count` trial against the dense model timed by the same worker right after it.", "")
    trials = sorted(_complete(doc, "layer-count"), key=lambda t: t.get("x") or 0)
    if not trials:
        _missing(d, "layer-count", doc)
        return
    rows, reasons, protocols = [], set(), set()
    for t in trials:
        e = t.get("efficiency") or {}
        if e.get("protocol"):
            protocols.add(e["protocol"])
        if e.get("energy_change") is None:
            reasons.add(e.get("energy_reason") or "no energy counter")
        iqr = e.get("decode_ms_iqr_pct")
        rows.append([_trial_ref(t), str(t.get("label")), _size(t),
                     "n/a" if e.get("decode_ms") is None else f"{e['decode_ms']:.2f}",
                     "n/a" if e.get("decode_ms_dense") is None else f"{e['decode_ms_dense']:.2f}",
                     _pct(e.get("latency_change")), "n/a" if iqr is None else f"{iqr:.0f}%",
                     _pct(e.get("ideal_latency_change")),
                     _pct(e.get("energy_change")) if e.get("energy_change") is not None else "not measured"])
    d.add(*_table(["trial", "layers", "size change", "decode ms/token", "dense ms/token", "latency change",
                   "timing IQR", "memory-bound ideal", "energy change"], rows))
    if protocols:
        d.add("Protocol: " + "; ".join(sorted(protocols)) + ".", "")
    if reasons:
        d.add("Energy not measured: " + "; ".join(sorted(reasons)) + ".", "")
    point = nine_percent_point(doc)
    e = (point or {}).get("efficiency") or {}
    change, iqr = e.get("latency_change"), e.get("decode_ms_iqr_pct")
    falling = sum(1 for t in trials if ((t.get("efficiency") or {}).get("latency_change") or 0) < 0)
    timed = sum(1 for t in trials if (t.get("efficiency") or {}).get("latency_change") is not None)
    drift = dense_timing_drift(doc) or (0.0, 0.0, 0.0)
    ideal = e.get("ideal_latency_change")
    if change is None or iqr is None:
        d.add(_verdict_line(UNSURE, "No latency change with a timing spread at the 9%-size point."), "")
    elif drift[0] > DENSE_DRIFT_LIMIT:
        d.add(_verdict_line(UNSURE, f"The dense model's own decode time, measured after every trial, ranged "
                                    f"{drift[1]:.1f}-{drift[2]:.1f} ms/token over the run ({drift[0]:.0%} of its "
                                    f"median, more than the {DENSE_DRIFT_LIMIT:.0%} this verdict tolerates): the "
                                    "machine's speed changed more than the effects measured (other work ran "
                                    "beside it), so the latency changes above are not evidence either way. "
                                    "Rerun on a quiet machine."), "")
    elif ideal is not None and change < ideal - iqr / 100:
        d.add(_verdict_line(UNSURE, f"At the 9%-size point latency changed {_pct(change)}, beyond the memory-bound "
                                    f"ideal ({_pct(ideal)}) by more than the timing spread (IQR {iqr:.0f}%): a "
                                    "decomposed model cannot read fewer bytes than that bound, so this is a timing "
                                    "artefact, not evidence."), "")
    else:
        noise = iqr / 100
        verdict = HOLDS if change < -noise else FAILS if change > noise else UNSURE
        d.add(_verdict_line(verdict, f"At the 9%-size point ({point.get('label')}) latency changed "  # type: ignore[union-attr]
                                     f"{_pct(change)} against a timing spread (IQR) of {iqr:.0f}%; no standard error "
                                     f"exists for a timing, so a change within the IQR is inconclusive. Latency fell "
                                     f"at {falling} of {timed} timed point(s). Energy: "
                                     + ("measured, see the table." if not reasons else "not measured, so the energy "
                                        "half of the claim is not tested.")), "")
    d.figure("report", "efficiency-vs-size-layer-count", "Latency and energy vs size (layer-count)")
    d.add(*d.why("CPU vs GPU: decode on a few CPU threads of a shared machine, not a GPU; a small model's decode is "
                "dominated by fixed per-token overheads that decomposition does not shrink, and rank-1 factors add "
                "two small matrix products per tensor"))


def _claim_removal(d: _Doc, doc: dict[str, Any], numbers: dict[str, Any]) -> None:
    d.add("## f. Rank 1 on whole layers vs removing them", "",
          "Paper: rank 1 on all 7 tensors of a layer leaves it nearly inert, so it is compared with removing the "
          "layer; the two should be about equal. Measured: `layer-count` and `layer-removal` at the same n (the "
          "same evenly spaced layers).", "")
    pairs = numbers.get("rank1_vs_removal")
    if not pairs:
        for sweep in ("layer-count", "layer-removal"):
            if not _complete(doc, sweep):
                _missing(d, sweep, doc)
                return
        d.add("No layer count completed in both sweeps.", "", _verdict_line(UNSURE, "Nothing to compare."), "")
        return
    decomposed = {t.get("x"): t for t in _complete(doc, "layer-count")}
    removed = {t.get("x"): t for t in _complete(doc, "layer-removal")}
    rows, diffs = [], []
    for p in pairs:
        n = p["n"]
        diff = None if p["rank1"] is None or p["removal"] is None else p["rank1"] - p["removal"]
        se = _combined(p["rank1_stderr"], p["removal_stderr"])
        if diff is not None:
            diffs.append((diff, se))
        rows.append([str(n), f"{_trial_ref(decomposed[n])} / {_trial_ref(removed[n])}",
                     f"{_size(decomposed[n])} / {_size(removed[n])}", _pts(p["rank1"], p["rank1_stderr"]),
                     _pts(p["removal"], p["removal_stderr"]), _signed_pts(diff, se)])
    d.add(*_table(["n layers", "trials (rank 1 / removed)", "size change (rank 1 / removed)",
                   "rank 1, mean acc (%)", "removed, mean acc (%)", "difference (points)"], rows))
    if not diffs:
        d.add(_verdict_line(UNSURE, "No pair with both accuracies."), "")
    else:
        mean, se = _group_mean(diffs)
        verdict = equivalence_verdict(mean, se)
        d.add(_verdict_line(verdict, f"Mean difference over {len(diffs)} layer count(s): {_signed_pts(mean, se)} "
                                     f"points (the claim: about 0; holds only if the 2-standard-error interval is "
                                     f"within ±{100 * EQUIVALENCE_MARGIN:.0f} points)."), "")
    d.figure("report", "accuracy-vs-size-layer-removal", "Accuracy vs size reduction (layer-removal)")
    d.add(*d.why("a rank-1 layer still passes its residual stream and keeps its norms, so it is not exactly removed"))


def _claim_encoder(d: _Doc, enc: dict[str, Any] | None, summary: dict[str, Any]) -> None:
    d.add("## g. The encoder case", "",
          "Paper: the trade-off carries over to an encoder (its BERT study): accuracy falls as more layers are "
          "decomposed at rank 1 (no number of it is compared here). Measured: `minilm-l6` (6 layers), STS-B "
          "Spearman correlation, rank 1 on all tensors of n evenly spaced layers.", "")
    if enc is None:
        why = summary.get("encoder_skipped") or "encoder-results.json is not in the output folder"
        d.add(f"Not measured: {why}.", "", _verdict_line(UNSURE, "Nothing to compare."), "")
        return
    dense = ((enc.get("dense") or {}).get("metrics") or {}).get("stsb")
    trials = sorted(_complete(enc, "layer-count"), key=lambda t: t.get("x") or 0)
    if dense is None or not trials:
        d.add("No dense STS-B value or no completed layer-count trial in encoder-results.json.", "",
              _verdict_line(UNSURE, "Nothing to compare."), "")
        return

    def rho(m: dict[str, Any]) -> str:
        if m.get("value") is None:
            return "n/a"
        return f"{m['value']:.3f}" + (f" ± {m['stderr']:.3f}" if m.get("stderr") is not None else "")

    rows = [["dense", "0", "+0.0%", rho(dense), ""]]
    last = None
    for t in trials:
        m = (t.get("metrics") or {}).get("stsb") or {}
        change = None if m.get("value") is None else m["value"] - dense["value"]
        rows.append([_trial_ref(t), str(t.get("x")), _size(t), rho(m),
                     "n/a" if change is None else f"{change:+.3f}"])
        if m.get("value") is not None:
            last = (t, m, change)
    d.add(f"STS-B validation pairs: n={dense.get('n')}; Spearman correlation ± standard error.", "")
    d.add(*_table(["trial", "layers decomposed", "size change", "STS-B Spearman", "change vs dense"], rows))
    if last is None:
        d.add(_verdict_line(UNSURE, "No trial with a value."), "")
    else:
        t, m, change = last
        se = _combined(dense.get("stderr"), m.get("stderr"))
        verdict = directional_verdict(change, se, -1)
        d.add(_verdict_line(verdict, f"With {t.get('x')} layer(s) decomposed Spearman changed {change:+.3f}"
                                     + (f" ± {se:.3f}" if se is not None else " (stderr n/a)")
                                     + " (the claim: negative)."), "")
    d.figure("encoder-report", "accuracy-vs-size-layer-count", "STS-B vs size reduction (encoder layer-count)")
    d.add(*d.why("model: MiniLM-L6 (about 22M parameters, 6 layers) stands in for the paper's BERT model; with "
                 "6 layers each one decomposed is a sixth of the encoder"))


def _not_run(d: _Doc, doc: dict[str, Any], summary: dict[str, Any], mode: str) -> None:
    d.add("## Not run in this mode", "")
    notes = list(summary.get("notes") or [])
    if summary.get("encoder_skipped"):
        notes.append(f"encoder case skipped: {summary['encoder_skipped']}")
    failed = [t for t in doc.get("trials", []) if t.get("state") != "COMPLETE"]
    for t in failed:
        notes.append(f"trial #{t.get('number')} ({t.get('sweep')} {t.get('label')}) is {t.get('state')}"
                     + (f": {t['error']}" if t.get("error") else ""))
    if mode != "full":
        notes.append(f"this is a --{mode} run: seeded subsets and a few points per sweep. {FULL_TIME}")
    d.add(*(f"- {n}" for n in notes) if notes else ["- nothing: every task and point of the plan was measured"])
    d.add("")


def _header(d: _Doc, out_dir: Path, doc: dict[str, Any], enc: dict[str, Any] | None, summary: dict[str, Any],
            mode: str, numbers: dict[str, Any]) -> None:
    spec = doc.get("spec") or {}
    env = doc.get("environment") or {}
    model = summary.get("model") or spec.get("model") or env.get("model") or "unknown"
    enc_model = ((enc or {}).get("spec") or {}).get("model")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((out_dir / "results.json").stat().st_mtime))
    d.add("# Reproducing Moar et al. (IISWC 2024) with rankwise", "",
          "What rankwise measured for each claim of \"Characterizing the Accuracy-Efficiency Trade-off of Low-rank "
          f"Decomposition in Language Models\", next to the paper's {PAPER_MODEL} numbers where it gives them. Every "
          f"number below comes from the JSON files in [`{d.assets}/`]({d.assets}/) (trial numbers refer to "
          f"[`results.json`]({d.assets}/results.json)).", "",
          "## How it was produced", "")
    flags = f"--{mode}" + (f" --model {model}" if model != DEFAULT_MODEL else "")
    shrunk = re.search(r"-i(\d+)p(\d+)-", str(doc.get("study") or ""))  # the hidden testing flags
    if shrunk:
        flags += "".join(f" --{k} {v}" for k, v in zip(("items", "points"), shrunk.groups(), strict=True)
                         if v != "0")
    if enc is None and any("--no-encoder" in n for n in summary.get("notes") or []):
        flags += " --no-encoder"
    items = ", ".join(task_items(t) for t in spec.get("tasks") or []) or "not recorded"
    seeds = sorted({t.get("seed") for t in spec.get("tasks") or [] if t.get("sample") is not None})
    ppl = spec.get("perplexity") or {}
    lines = [f"- command: `rankwise paper {flags} -o {out_dir} --doc PATH` (PATH: this document); regenerated "
             f"from that folder with `rankwise paper --from-results -o {out_dir} --doc PATH`",
             f"- mode: {mode}; decoder model: {model} (study `{doc.get('study')}`)"
             + (f"; encoder model: {enc_model} (study `{enc.get('study')}`)" if enc else "; encoder: not run"),
             f"- items per task: {items}; seeded samples, seed(s) {', '.join(map(str, seeds)) or 'n/a'}",
             f"- protocol: {numbers.get('protocol')}; accuracy is `acc` (not `acc_norm`)"
             + (f"; WikiText-2 token-level perplexity on {ppl.get('windows')} window(s) of {ppl.get('seq_len')} "
                "tokens" if ppl else ""),
             f"- machine: device {env.get('device', 'not recorded')}, dtype {env.get('dtype', 'not recorded')}, "
             f"{env.get('threads', spec.get('threads', '?'))} thread(s); versions "
             + (", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()) or "not recorded"),
             f"- results written: {stamp}"]
    d.add(*lines, "", "Differences from the paper's setup, which apply to every claim below:", "",
          *(f"- {r}" for r in d.reasons), "")
    d.add("Verdicts: a difference is compared with 2 standard errors (sqrt(se_a^2 + se_b^2), conservative since "
          "both are measured on the same items): *holds* beyond them in the claimed direction, *does not hold* "
          "beyond them the other way, *inconclusive* within them. Claims of equality hold only when the "
          f"2-standard-error interval lies within ±{100 * EQUIVALENCE_MARGIN:.0f} points.", "")


def _build(out_dir: Path, mode: str | None, assets: str) -> tuple[str, list[Figure]]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise RankwiseError(f"{out_dir} is not a folder: give the output folder of a 'rankwise paper' run (-o DIR)")
    doc = _load(out_dir / "results.json", required=True)
    assert doc is not None
    if doc.get("schema") != "rankwise.study/1":
        raise RankwiseError(f"{out_dir / 'results.json'} is not a study results document (schema "
                            f"{doc.get('schema')!r}, expected 'rankwise.study/1')")
    enc = _load(out_dir / "encoder-results.json", required=False)
    summary = _load(out_dir / "headlines.json", required=False) or {}
    study = str(doc.get("study") or "")
    mode = mode or summary.get("mode") or next((m for m in ("quick", "standard", "full")
                                                if study.startswith(f"paper-{m}")), "unknown")
    numbers = headlines(doc)["numbers"]
    dense = doc.get("dense") or {}
    model = summary.get("model") or (doc.get("spec") or {}).get("model") or DEFAULT_MODEL
    d = _Doc(out_dir, assets, model, mode)
    _header(d, out_dir, doc, enc, summary, mode, numbers)
    if not dense:
        d.add("**results.json has no dense record: changes against the dense model cannot be given.**", "")
    _claim_rank(d, doc)
    _claim_early(d, doc, numbers.get("dense_mean_accuracy"), numbers.get("dense_stderr"))
    _claim_adjacent(d, doc)
    _claim_nine(d, doc, numbers)
    _claim_latency(d, doc)
    _claim_removal(d, doc, numbers)
    _claim_encoder(d, enc, summary)
    _not_run(d, doc, summary, mode)
    figures = list(dict.fromkeys(d.figures))
    return "\n".join(d.lines).rstrip() + "\n", figures


def reproduction_markdown(out_dir: Path, *, mode: str | None = None, assets: str = "paper-reproduction") -> str:
    """The reproduction document of a paper output folder; ``mode`` overrides the one recorded in
    headlines.json; ``assets``: the folder (relative to the document) holding its JSON files and figures."""
    return _build(Path(out_dir), mode, assets)[0]


ASSET_JSON = ("results.json", "encoder-results.json", "headlines.json")
ASSET_DIRS = ("figures", "encoder-figures")


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def check_reproduction_dest(dest: Path) -> tuple[Path, Path]:
    """The document's path and its assets folder, checked (before a run, too): a one-line RankwiseError when the
    path is a folder, cannot be written, or its assets folder holds files rankwise does not write there."""
    dest = check_output_path(dest, "file", "--doc")
    assets = dest.parent / dest.stem
    if assets.exists():
        unknown = sorted(p.name for p in assets.iterdir() if p.name not in (*ASSET_JSON, *ASSET_DIRS)
                         and not p.name.startswith(".")) if assets.is_dir() else [assets.name]
        if unknown:
            raise RankwiseError(f"{assets} holds files rankwise did not write ({', '.join(unknown)}); "
                                "remove them or choose another --doc path")
    return dest, assets


def write_reproduction(out_dir: Path, dest: Path, *, mode: str | None = None) -> Path:
    """Write the document to ``dest`` and, in ``dest``'s folder, ``<dest stem>/`` with the JSON files and the
    figures it references (figures no longer referenced are removed); every file is written atomically, the
    document last. Returns the assets folder."""
    out_dir = Path(out_dir)
    dest, assets = check_reproduction_dest(dest)
    text, figures = _build(out_dir, mode, assets.name)
    for name in ASSET_JSON:
        if (out_dir / name).is_file():
            _copy(out_dir / name, assets / name)
        else:
            (assets / name).unlink(missing_ok=True)
    wanted = {rel for _, rel in figures}
    for src, rel in figures:
        _copy(src, assets / rel)
    for sub in ASSET_DIRS:
        for old in (assets / sub).glob("*") if (assets / sub).is_dir() else []:
            if old.is_file() and f"{sub}/{old.name}" not in wanted and old.suffix in (".png", ".svg"):
                old.unlink()
    write_text_atomic(dest, text)
    return assets

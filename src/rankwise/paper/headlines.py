"""The three lines a newcomer wants from a paper run, measured from the results document.

1. the accuracy change at the layer-count point nearest the paper's 9% size reduction;
2. rank-1 decomposition of n layers against removing the same n layers (mean accuracy side by side);
3. the decode latency change at that point, or why it is not measurable.

Every number carries its protocol: the metric (acc), the items per task, the standard error. Nothing is
invented: a line whose trials are missing says so.
"""

from __future__ import annotations

import math
from typing import Any

ACCURACY_METRICS = ("acc", "exact_match", "exact_match_strict")
TARGET_REDUCTION = 0.09


def _complete(doc: dict[str, Any], sweep: str) -> list[dict[str, Any]]:
    return [t for t in doc.get("trials", []) if t.get("state") == "COMPLETE" and t.get("sweep") == sweep]


def mean_accuracy_with_stderr(record: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """Mean of the accuracy-type headline metrics, its standard error (tasks independent), and the protocol."""
    entries = [(k, m) for k, m in (record.get("metrics") or {}).items()
               if m.get("metric") in ACCURACY_METRICS and m.get("value") is not None]
    if not entries:
        return None, None, "no accuracy task"
    k = len(entries)
    mean = sum(m["value"] for _, m in entries) / k
    ses = [acc_stderr(m) for _, m in entries]
    se = math.sqrt(sum(s * s for s in ses)) / k if all(s is not None for s in ses) else None
    ns = sorted({m.get("n") for _, m in entries})
    items = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
    return mean, se, f"acc, mean of {k} tasks ({', '.join(n for n, _ in entries)}), {items} items each"


def acc_stderr(m: dict[str, Any]) -> float | None:
    """The task's stderr; for an accuracy without one (MMLU's group), the sample stderr of its n 0/1 scores,
    sqrt(p(1-p)/(n-1)) - the formula the per-task values use."""
    if m.get("stderr") is not None:
        return m["stderr"]
    n, p = m.get("n"), m.get("value")
    if m.get("metric") == "acc" and isinstance(n, int) and n > 1 and p is not None:
        return math.sqrt(p * (1 - p) / (n - 1))
    return None


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _se(se: float | None) -> str:
    return f" ±{se:.3f}" if se is not None else " (stderr n/a)"


def nine_percent_point(doc: dict[str, Any]) -> dict[str, Any] | None:
    trials = [t for t in _complete(doc, "layer-count") if t.get("size_reduction") is not None]
    if not trials:
        return None
    return min(trials, key=lambda t: abs(t["size_reduction"] - TARGET_REDUCTION))


#: The latency numbers need a steady machine: the dense model is re-timed after every trial, and when those
#: timings spread by more than this share of their median, a change says more about the machine than about
#: the model (other work ran beside the study).
DENSE_DRIFT_LIMIT = 0.2


def dense_timing_drift(doc: dict[str, Any]) -> tuple[float, float, float] | None:
    """(spread / median, min, max) of the dense decode times re-measured after the layer-count trials."""
    dense = sorted(ms for t in _complete(doc, "layer-count")
                   if (ms := (t.get("efficiency") or {}).get("decode_ms_dense")) is not None)
    if len(dense) < 2:
        return None
    return (dense[-1] - dense[0]) / dense[len(dense) // 2], dense[0], dense[-1]


def headlines(doc: dict[str, Any]) -> dict[str, Any]:
    """The three headline lines and the numbers behind them."""
    dense = doc.get("dense") or {}
    d_mean, d_se, proto = mean_accuracy_with_stderr(dense)
    lines: list[str] = []
    numbers: dict[str, Any] = {"dense_mean_accuracy": d_mean, "dense_stderr": d_se, "protocol": proto}

    point = nine_percent_point(doc)
    if point is None or d_mean is None:
        lines.append("9%-size point: no completed rank-1 layer-count trial (or no accuracy task) to measure it")
    else:
        p_mean, p_se, _ = mean_accuracy_with_stderr(point)
        change = None if p_mean is None else p_mean - d_mean
        numbers["nine_percent"] = {"trial": point.get("number"), "label": point.get("label"),
                                   "size_reduction": point["size_reduction"], "mean_accuracy": p_mean,
                                   "stderr": p_se, "change": change}
        lines.append(
            f"9%-size point (rank 1, all tensors, layer-count {point.get('label')}, size "
            f"{_pct(-point['size_reduction'])}): mean acc {d_mean:.3f}{_se(d_se)} dense -> "
            f"{p_mean:.3f}{_se(p_se)} ({(change or 0) * 100:+.1f} points; {proto})")

    decomposed = {t.get("x"): t for t in _complete(doc, "layer-count")}
    removed = {t.get("x"): t for t in _complete(doc, "layer-removal")}
    common = sorted(set(decomposed) & set(removed), key=lambda x: (x is None, x))
    if not common:
        lines.append("rank 1 vs removal: no layer count completed in both sweeps")
    else:
        pairs, parts = [], []
        for n in common:
            a, a_se, _ = mean_accuracy_with_stderr(decomposed[n])
            b, b_se, _ = mean_accuracy_with_stderr(removed[n])
            pairs.append({"n": n, "rank1": a, "rank1_stderr": a_se, "removal": b, "removal_stderr": b_se})
            if a is not None and b is not None:
                parts.append(f"n={n} {a:.3f} vs {b:.3f}")
        numbers["rank1_vs_removal"] = pairs
        ses = [s for p in pairs for s in (p["rank1_stderr"], p["removal_stderr"]) if s is not None]
        se_text = f"stderr ±{min(ses):.3f}-{max(ses):.3f}" if ses else "stderr n/a"
        lines.append(f"rank 1 on all tensors vs removing the same layers (mean acc, decomposed vs removed): "
                     f"{'; '.join(parts)} ({proto}; {se_text})")

    eff = (point or {}).get("efficiency") or {}
    if point is None:
        lines.append("latency: no layer-count trial to measure it at")
    elif eff.get("latency_change") is None:
        why = eff.get("protocol") if eff else "the study measured no efficiency"
        lines.append(f"latency at the 9%-size point: not measured ({why})")
    else:
        numbers["latency"] = {k: eff.get(k) for k in ("latency_change", "decode_ms", "decode_ms_dense",
                                                        "decode_ms_iqr_pct", "ideal_latency_change",
                                                        "energy_change", "energy_reason", "protocol")}
        iqr = eff.get("decode_ms_iqr_pct")
        energy = (f"; energy {_pct(eff['energy_change'])}" if eff.get("energy_change") is not None
                  else f"; energy not measured ({eff.get('energy_reason') or 'no counter'})")
        ideal = (f"; memory-bound ideal {_pct(eff['ideal_latency_change'])}"
                 if eff.get("ideal_latency_change") is not None else "")
        lines.append(
            f"latency at the 9%-size point: decode {eff['decode_ms']:.2f} vs {eff['decode_ms_dense']:.2f} ms/token "
            f"dense ({_pct(eff['latency_change'])}; {eff.get('protocol')}"
            f"{f', IQR {iqr:.0f}%' if iqr is not None else ''}; dense timed right after){ideal}{energy}")
        drift = dense_timing_drift(doc)
        if drift is not None and drift[0] > DENSE_DRIFT_LIMIT:
            lines[-1] += (f"; NOT EVIDENCE: the dense model's own time ranged {drift[1]:.1f}-{drift[2]:.1f} ms/token "
                          "over the run (the machine was not quiet)")
    return {"lines": lines, "numbers": numbers}


def encoder_line(doc: dict[str, Any]) -> str:
    """The encoder case in one line: STS-B Spearman per layer count against the dense model."""
    dense = ((doc.get("dense") or {}).get("metrics") or {}).get("stsb")
    trials = sorted(_complete(doc, "layer-count"), key=lambda t: t.get("x") or 0)
    if dense is None or not trials:
        return "encoder (minilm-l6, STS-B): no completed trial"
    parts = []
    for t in trials:
        m = (t.get("metrics") or {}).get("stsb") or {}
        if m.get("value") is not None:
            parts.append(f"{t.get('label')} (size {_pct(-(t.get('size_reduction') or 0))}) {m['value']:.3f}")
    return (f"encoder (minilm-l6, rank 1 on all tensors): STS-B spearman, n={dense['n']} pairs, dense "
            f"{dense['value']:.3f}{_se(dense.get('stderr'))}; " + "; ".join(parts))

"""The study results document (``rankwise.study/1``) as reports read it: loading, checking, and accessors.

Reports never trust a document to be complete: a study that is still running has RUNNING and WAITING
trials without metrics, a failed trial has an ``error`` and nothing else, an old export may lack
``efficiency``. Every accessor here returns ``None`` for what is missing, so every figure and table can
show a missing value as missing instead of crashing on it. Only what makes the whole document unusable
(not JSON, wrong schema, no trial list) is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError

SCHEMA = "rankwise.study/1"

#: Trial states the schema defines, in the order the summary table counts them.
STATES = ("COMPLETE", "RUNNING", "WAITING", "PRUNED", "FAIL")

#: Metric names where a lower value is better (perplexities, bits per byte, losses).
_LOWER_IS_BETTER = ("perplexity", "ppl", "bits_per_byte", "bpb", "loss")


class ReportInputError(RankwiseError):
    """A results file that is missing, not JSON, or not a ``rankwise.study/1`` document."""


def load_document(path: str | Path) -> dict[str, Any]:
    """Read and check a results JSON file (``rankwise study export --json``); one-line errors on bad input."""
    path = Path(path)
    if not path.exists():
        raise ReportInputError(f"results file {path} does not exist (pass an exported study JSON or a storage URL)")
    if path.is_dir():
        raise ReportInputError(f"{path} is a directory; pass the study's exported results JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ReportInputError(f"{path} is not a text JSON file") from None
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return check_document(data, source=str(path))


def check_document(data: Any, source: str = "results") -> dict[str, Any]:
    """Check the parts every report needs: the schema tag, a trial list, and each trial's number and state."""
    if not isinstance(data, dict):
        raise ReportInputError(f"{source}: expected a JSON object with schema {SCHEMA!r}, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ReportInputError(f"{source}: schema is {schema!r}, expected {SCHEMA!r} (a `rankwise study export` file)")
    trials = data.get("trials")
    if not isinstance(trials, list):
        raise ReportInputError(f"{source}: 'trials' must be a list of trials")
    for i, trial in enumerate(trials):
        if not isinstance(trial, dict):
            raise ReportInputError(f"{source}: trials[{i}] must be an object")
        if "number" not in trial or "state" not in trial:
            raise ReportInputError(f"{source}: trials[{i}] lacks 'number' or 'state'")
    dense = data.get("dense")
    if dense is not None and not isinstance(dense, dict):
        raise ReportInputError(f"{source}: 'dense' must be a trial object or null")
    return data


# --- accessors ---------------------------------------------------------------------------------------------


def trials(doc: dict[str, Any], state: str | None = None, sweep: str | None = None) -> list[dict[str, Any]]:
    """The document's trials (optionally only one state / one sweep), in trial-number order."""
    out = [t for t in doc.get("trials") or []
           if (state is None or t.get("state") == state) and (sweep is None or t.get("sweep") == sweep)]
    return sorted(out, key=lambda t: (t.get("number") is None, t.get("number") or 0))


def complete(doc: dict[str, Any], sweep: str | None = None) -> list[dict[str, Any]]:
    return trials(doc, "COMPLETE", sweep)


def sweeps(doc: dict[str, Any]) -> list[str]:
    """Sweep names in first-appearance order."""
    seen: list[str] = []
    for t in trials(doc):
        s = t.get("sweep") or "trials"
        if s not in seen:
            seen.append(s)
    return seen


def number(value: Any) -> float | None:
    """A finite float, or None for null / NaN / non-numbers (the document writes NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def lower_is_better(metric: str) -> bool:
    return any(key in metric.lower() for key in _LOWER_IS_BETTER)


def benchmarks(doc: dict[str, Any], kind: str = "score") -> list[str]:
    """Benchmark names with a metric of ``kind`` (``score``: higher is better; ``loss``: lower), in order.

    Dense first (its order is the study's task order), then any benchmark only trials have.
    """
    names: list[str] = []
    for t in [doc.get("dense") or {}, *trials(doc)]:
        for name, m in (t.get("metrics") or {}).items():
            if not isinstance(m, dict) or name in names:
                continue
            if (kind == "loss") == lower_is_better(str(m.get("metric", ""))):
                names.append(name)
    return names


def metric(trial: dict[str, Any] | None, benchmark: str) -> dict[str, Any] | None:
    m = ((trial or {}).get("metrics") or {}).get(benchmark)
    return m if isinstance(m, dict) else None


def metric_value(trial: dict[str, Any] | None, benchmark: str) -> float | None:
    return number((metric(trial, benchmark) or {}).get("value"))


def metric_label(doc: dict[str, Any], benchmark: str) -> str:
    """``arc_easy acc`` (the metric name as the document records it)."""
    for t in [doc.get("dense") or {}, *trials(doc)]:
        m = metric(t, benchmark)
        if m and m.get("metric"):
            return f"{benchmark} {m['metric']}"
    return benchmark


def protocols(doc: dict[str, Any], benchmark_names: Iterable[str]) -> list[str]:
    """``name: protocol (n=..)`` for each benchmark, from the dense trial or the first trial that has it."""
    out = []
    for name in benchmark_names:
        for t in [doc.get("dense") or {}, *trials(doc)]:
            m = metric(t, name)
            if m:
                proto = m.get("protocol") or "protocol not recorded"
                n = m.get("n")
                out.append(f"{name} {m.get('metric', '')}: {proto}" + (f" (n={n})" if n is not None else ""))
                break
    return out


def primary(doc: dict[str, Any]) -> tuple[str, str, bool]:
    """What "most accurate" means for this study: (key, label, higher_is_better).

    ``mean_accuracy`` when any trial has it (the schema's headline), else the first score-type benchmark,
    else the first loss-type one (e.g. a perplexity-only study).
    """
    if any(number(t.get("mean_accuracy")) is not None for t in [doc.get("dense") or {}, *trials(doc)]):
        return "mean_accuracy", "mean accuracy", True
    scores = benchmarks(doc, "score")
    if scores:
        return f"metric:{scores[0]}", metric_label(doc, scores[0]), True
    losses = benchmarks(doc, "loss")
    if losses:
        return f"metric:{losses[0]}", metric_label(doc, losses[0]), False
    return "mean_accuracy", "mean accuracy", True


def value_of(trial: dict[str, Any] | None, key: str) -> float | None:
    """A trial's value for an objective key: a top-level field, ``metric:NAME``, or ``efficiency.FIELD``."""
    if trial is None:
        return None
    if key.startswith("metric:"):
        return metric_value(trial, key.removeprefix("metric:"))
    if key.startswith("efficiency."):
        return number((trial.get("efficiency") or {}).get(key.removeprefix("efficiency.")))
    return number(trial.get(key))


def has_efficiency(doc: dict[str, Any]) -> bool:
    return any(isinstance(t.get("efficiency"), dict) for t in complete(doc))


def touched_targets(trial: dict[str, Any], n_layers: int | None = None) -> list[tuple[int, str]] | None:
    """The (layer, role) targets a trial actually changed, or None when the document does not say.

    From the decomposition report (targets not kept dense) when present; else from a plan written with
    explicit layer and role lists (no overrides), which is how sensitivity sweeps write theirs
    (``layers: all`` needs ``n_layers``). Roles are the plan's names (``all`` for every role).
    """
    report = trial.get("decomposition")
    if isinstance(report, dict) and isinstance(report.get("targets"), list):
        return [(int(t["layer"]), str(t["role"])) for t in report["targets"]
                if isinstance(t, dict) and not t.get("kept_dense") and "layer" in t and "role" in t]
    plan = trial.get("plan")
    if not isinstance(plan, dict) or plan.get("overrides"):
        return None
    layers, tensors = plan.get("layers"), plan.get("tensors")
    if isinstance(layers, int):
        layers = [layers]
    if layers == "all" and n_layers:
        layers = list(range(n_layers))
    if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
        return None
    if tensors == "all":
        return [(layer, "all") for layer in layers]
    if isinstance(tensors, str):
        tensors = [tensors]
    if not isinstance(tensors, list):
        return None
    return [(layer, str(role)) for layer in layers for role in tensors]

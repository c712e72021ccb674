"""Reading a study back: the results document (``rankwise.study/1``), a flat CSV, and a status summary.

The document is the contract with reports and paper (``/tmp/team/trial-schema.md``): the spec, the
environment, the dense record and one record per trial with plan, metrics (value, stderr, n, chance,
protocol), parameters, bytes, efficiency and the decomposition report. Failed, running and waiting trials
are listed too (with their error, or null metrics), so nothing a study did is hidden.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterable
from typing import Any

from rankwise.fileio import json_safe, write_text_atomic

TRIAL_KEYS = ("number", "state", "sweep", "label", "x", "plan", "kind", "params", "params_ratio",
              "size_reduction", "bytes", "metrics", "mean_accuracy", "efficiency", "decomposition",
              "seconds", "error", "worker")


def _seconds(frozen: Any) -> float | None:
    if frozen.datetime_start is None:
        return None
    end = frozen.datetime_complete
    if end is None:
        import datetime as _dt

        end = _dt.datetime.now()
    return (end - frozen.datetime_start).total_seconds()


def trial_record(frozen: Any, points: list[dict[str, Any]], retried_as: dict[int, int] | None = None,
                 grace_period: int | None = None) -> dict[str, Any]:
    """One trial in the schema's TRIAL shape (measured fields null when the trial has no record)."""
    from rankwise.studies.engine import _point_of

    rec = dict(frozen.user_attrs.get("record") or {})
    point_index = _point_of(frozen)
    point = points[point_index] if point_index is not None and point_index < len(points) else None
    out: dict[str, Any] = {
        "number": frozen.number, "state": frozen.state.name,
        "sweep": rec.get("sweep") or frozen.user_attrs.get("sweep") or (point or {}).get("sweep") or "search",
        "label": rec.get("label") or frozen.user_attrs.get("label") or (point or {}).get("label"),
        "x": rec.get("x", (point or {}).get("x")),
        "plan": rec.get("plan", (point or {}).get("plan")),
        "kind": rec.get("kind") or (point or {}).get("kind"),
    }
    for key in ("params", "params_ratio", "size_reduction", "bytes", "metrics", "mean_accuracy", "efficiency",
                "decomposition"):
        out[key] = rec.get(key)
    out["seconds"] = rec.get("seconds") if rec.get("seconds") is not None else _seconds(frozen)
    out["error"] = frozen.user_attrs.get("error")
    retry_number = (retried_as or {}).get(frozen.number)
    if out["error"] is None and frozen.state.name == "FAIL":
        out["error"] = (f"worker lost: no heartbeat for {grace_period} s (worker "
                        f"{frozen.user_attrs.get('worker', '?')})" if retry_number is not None
                        else "failed without an error message (worker lost; retries exhausted)")
    if retry_number is not None:
        out["error"] += f"; retried as trial {retry_number}"
        out["retried_as"] = retry_number
    out["worker"] = frozen.user_attrs.get("worker")
    for key in ("timings", "factor_cache", "hidden_cache", "note"):
        if key in rec:
            out[key] = rec[key]
    if frozen.values is not None:
        out["objective_values"] = list(frozen.values)
    if "point" in frozen.params:
        out["point"] = int(frozen.params["point"])
    history = frozen.system_attrs.get("retry_history")
    if history:
        out["retry_of"] = history[-1]
    return out


def retries(trials: Iterable[Any]) -> dict[int, int]:
    """Failed trial number -> the number of the trial queued to redo it (Optuna's retry history)."""
    out = {}
    for t in trials:
        history = t.system_attrs.get("retry_history")
        if history:
            out[history[-1]] = t.number
    return out


def study_document(storage: str, study_name: str | None = None) -> dict[str, Any]:
    """The results document of a study (see the module docstring); JSON-safe (NaN -> null)."""
    from rankwise.studies.engine import SCHEMA, load_study

    study, spec, _ = load_study(storage, study_name)
    attrs = study.user_attrs
    points = attrs.get("points", [])
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    retried_as = retries(trials)
    dense = attrs.get("dense")
    if dense is not None:
        dense = {"number": None, "state": "COMPLETE", **{k: dense.get(k) for k in TRIAL_KEYS if k in dense},
                 "plan": None, "kind": "dense", "error": None, "worker": dense.get("worker")}
        dense.setdefault("sweep", "dense")
        dense.setdefault("label", "dense")
        dense.setdefault("x", None)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "study": study.study_name, "storage": storage, "spec": attrs.get("spec"),
        "environment": attrs.get("environment"), "dense": dense,
        "trials": [trial_record(t, points, retried_as, spec.execution.grace_period) for t in trials],
    }
    if spec.search is not None:
        doc["pareto_front"] = pareto_numbers(study)
    doc["spec_hash"] = attrs.get("spec_hash")
    return json_safe(doc)


def pareto_numbers(study: Any) -> list[int]:
    """Trial numbers on the Pareto front of the complete, feasible trials.

    Computed here from each trial's stored values and its ``constraint`` attribute rather than read from
    ``study.best_trials``: Optuna filters by the constraints its sampler recorded, and a trial told before the
    sampler saw it (a retry, another worker's sampler) can lack them, which let an over-budget trial onto the
    front. Feasible means every constraint value is <= 0, Optuna's convention.
    """
    import optuna

    directions = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions]
    points: list[tuple[int, tuple[float, ...]]] = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.values is None or any(c > 0 for c in t.user_attrs.get("constraint") or []):
            continue
        points.append((t.number, tuple(s * v for s, v in zip(directions, t.values, strict=True))))
    return sorted(n for n, p in points if not any(_dominates(q, p) for _, q in points))


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (all objectives minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per trial (the dense record first, number ``dense``), every metric a column."""
    rows = []
    records: Iterable[dict[str, Any]] = ([doc["dense"]] if doc.get("dense") else []) + list(doc["trials"])
    for rec in records:
        row: dict[str, Any] = {}
        for key in TRIAL_KEYS:
            if key in ("metrics", "efficiency"):
                _flatten(key, rec.get(key) or {}, row)
            elif key == "plan":
                row["plan"] = json.dumps(rec.get("plan")) if rec.get("plan") is not None else ""
            elif key == "decomposition":
                summary = (rec.get("decomposition") or {}).get("summary") or {}
                _flatten("decomposition", summary, row)
            else:
                row[key] = rec.get(key)
        if rec.get("number") is None:
            row["number"] = "dense"
        rows.append(row)
    return rows


def write_csv(path: str, doc: dict[str, Any]) -> int:
    rows = csv_rows(doc)
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns and not k.startswith("metrics.") and not k.startswith("efficiency."):
                columns.append(k)
    extra = sorted({k for row in rows for k in row if k.startswith(("metrics.", "efficiency."))})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())
    return len(rows)


def status(storage: str, study_name: str | None = None) -> dict[str, Any]:
    """Counts per state, progress, an ETA from the mean trial time and the running workers, and failures."""
    from optuna.trial import TrialState

    from rankwise.studies.engine import load_study

    study, spec, points = load_study(storage, study_name)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    total = len(points) if spec.grid is not None else spec.search.n_trials  # type: ignore[union-attr]
    done_points = set()
    for t in trials:
        if t.state == TrialState.COMPLETE:
            done_points.add(t.params.get("point", t.number))
    done = len(done_points)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete]
    running = counts["RUNNING"]
    mean = sum(durations) / len(durations) if durations else None
    remaining = max(0, total - done)
    eta = None if mean is None else mean * remaining / max(1, running)
    retried_as = retries(trials)
    failures = []
    for t in trials:
        if t.state == TrialState.FAIL:
            rec = trial_record(t, [p.to_dict() for p in points], retried_as, spec.execution.grace_period)
            failures.append({"number": t.number, "label": rec["label"], "error": rec["error"]})
    return {"study": study.study_name, "storage": storage, "kind": spec.kind, "total": total, "done": done,
            "counts": counts, "mean_trial_seconds": mean, "eta_seconds": eta, "running_workers": running,
            "dense_done": "dense" in study.user_attrs, "failures": failures, "checked_at": time.time()}


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown (no trial finished yet)"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def write_json(path: str, doc: dict[str, Any]) -> None:
    from rankwise.fileio import write_json_atomic

    write_json_atomic(path, doc)

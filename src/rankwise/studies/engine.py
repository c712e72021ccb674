"""The study engine: a study is an Optuna study; each design point is a trial; workers share the storage.

Creating a study (:func:`create_or_resume`) stores the validated spec, its hash and the expanded design
points in the study's user attributes and, for a grid, enqueues one WAITING trial per point. A study name
that exists with a different spec hash is refused (never mixed); the same spec resumes it.

A worker (:func:`work`) loads the model once, makes sure the dense record exists, then loops:

1. fail stale trials: a RUNNING trial whose heartbeat is older than the grace period lost its worker
   (SIGKILL, OOM, power loss); it is marked FAIL and a WAITING copy queued (Optuna's
   ``RetryFailedTrialCallback``, at most ``max_retry`` times per point) - both atomic, so exactly once;
2. claim work: a grid pops a WAITING trial (atomic WAITING -> RUNNING); a search pops a waiting retry or
   asks its sampler (NSGA-II or TPE, budget as a constraint) while fewer than ``n_trials`` exist;
3. run it with a heartbeat thread, store the record (plan, metrics, timings, decomposition report) as a
   user attribute, and tell Optuna the objective values;
4. when nothing is waiting but other workers still run trials, wait for them (their trial may go stale
   and need a retry); when nothing is running either, stop.

Workers are built on ``ask``/``tell`` (not ``optimize``), because a grid must never let the sampler invent
points; ``optimize`` records heartbeats itself, so here a thread does (``storage.record_heartbeat``) and
the stale check is step 1. A COMPLETE trial is never touched again, so restarting any command resumes.
Ctrl-C marks the current trial FAIL, queues it again and says which trial was abandoned.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rankwise.errors import RankwiseError, first_line
from rankwise.fileio import json_safe
from rankwise.settings import installed_version
from rankwise.studies.points import DesignPoint, expand_grid, validate_points
from rankwise.studies.spec import StudySpec, spec_from_stored
from rankwise.studies.storage import open_storage, resolve_name, study_names, transition

SCHEMA = "rankwise.study/1"
POINT_PARAM = "point"


# --------------------------------------------------------------------------------------------- creation


def directions(spec: StudySpec) -> list[str]:
    return [o.direction for o in spec.objectives]


def environment(spec: StudySpec) -> dict[str, Any]:
    import optuna
    import torch
    import transformers

    return {"model": spec.model, "dtype": spec.dtype, "device": spec.device,
            "versions": {"rankwise": installed_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "optuna": optuna.__version__},
            "threads": spec.threads}


def expand_points(spec: StudySpec, model: Any) -> list[DesignPoint]:
    """The grid's points for this model (validated against it); empty for a search."""
    if spec.grid is None:
        return []
    from rankwise.models.adapters import adapter_for

    adapter = adapter_for(model)
    points = expand_grid(spec.grid, adapter.n_layers, adapter.roles)
    validate_points(points, model)
    return points


def _point_of(trial: Any) -> int | None:
    if POINT_PARAM in trial.params:
        return int(trial.params[POINT_PARAM])
    fixed = trial.system_attrs.get("fixed_params") or {}
    return int(fixed[POINT_PARAM]) if POINT_PARAM in fixed else None


def enqueue_missing(study: Any, points: list[DesignPoint]) -> int:
    """Queue every point that has no trial yet (idempotent: a creator killed mid-way is completed later)."""
    from optuna.trial import TrialState

    have = set()
    for t in study.get_trials(deepcopy=False):
        p = _point_of(t)
        if p is not None and t.state != TrialState.FAIL:
            have.add(p)
    failed = {p for t in study.get_trials(deepcopy=False) if (p := _point_of(t)) is not None} - have
    added = 0
    for i, point in enumerate(points):
        if i in have or i in failed:
            continue
        study.enqueue_trial({POINT_PARAM: i}, user_attrs={"sweep": point.sweep, "label": point.label})
        added += 1
    return added


def check_existing(spec: StudySpec, storage_url: str, name: str) -> None:
    """An existing study of this name must have been created from the same spec (checked before any model
    loads): a one-line error otherwise, so two specs' trials are never mixed."""
    import optuna

    storage = open_storage(storage_url)
    if name in study_names(storage):
        old = optuna.load_study(study_name=name, storage=storage).user_attrs.get("spec_hash")
        if old != spec.hash:
            raise RankwiseError(f"study '{name}' in {storage_url} exists with a different spec (hash {old}, this "
                                f"spec {spec.hash}): choose another --name or run the original spec")


def create_or_resume(spec: StudySpec, storage_url: str, name: str, model: Any) -> tuple[Any, list[DesignPoint], bool]:
    """Create the study (spec, hash, points, queued grid trials) or resume it; (study, points, created)."""
    import optuna

    storage = open_storage(storage_url)
    created = False
    if name in study_names(storage):
        check_existing(spec, storage_url, name)
        study = optuna.load_study(study_name=name, storage=storage)
        points = [DesignPoint.from_dict(d) for d in study.user_attrs.get("points", [])]
    else:
        points = expand_points(spec, model)
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=directions(spec))
        except optuna.exceptions.DuplicatedStudyError:
            return create_or_resume(spec, storage_url, name, model)
        study.set_user_attr("schema", SCHEMA)
        study.set_user_attr("spec", json_safe(spec.to_dict()))
        study.set_user_attr("points", [p.to_dict() for p in points])
        study.set_user_attr("environment", environment(spec))
        study.set_user_attr("spec_hash", spec.hash)  # last: a study with a hash is complete
        created = True
    if spec.grid is not None:
        enqueue_missing(study, points)
    return study, points, created


def load_study(storage_url: str, name: str | None, *, heartbeat: bool = False) -> tuple[Any, StudySpec, list[DesignPoint]]:
    """An existing study with its spec and points (one-line errors for a missing or foreign study)."""
    import optuna

    storage = open_storage(storage_url)
    name = resolve_name(storage, storage_url, name)
    study = optuna.load_study(study_name=name, storage=storage)
    attrs = study.user_attrs
    if "spec_hash" not in attrs or "spec" not in attrs:
        raise RankwiseError(f"study '{name}' in {storage_url} is not a rankwise study (no spec stored)")
    spec = spec_from_stored(attrs["spec"], name)
    if heartbeat:
        ex = spec.execution
        storage = open_storage(storage_url, ex.heartbeat_interval, ex.grace_period)
        study = optuna.load_study(study_name=name, storage=storage)
    points = [DesignPoint.from_dict(d) for d in attrs.get("points", [])]
    return study, spec, points


# --------------------------------------------------------------------------------------------- worker


class Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds from a thread, while the trial runs."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is caught by the grace period, not here
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _rdb(study: Any) -> Any:
    storage = study._storage
    return getattr(storage, "_backend", storage)


def fail_stale(study: Any, spec: StudySpec, log: Callable[[str], None]) -> list[int]:
    """Fail trials whose worker stopped beating, and queue each once more (exactly once: atomic)."""
    import optuna
    from optuna.trial import TrialState

    rdb = _rdb(study)
    failed = []
    for trial_id in rdb._get_stale_trial_ids(study._study_id):
        if not transition(rdb, trial_id, TrialState.RUNNING, TrialState.FAIL):
            continue
        # A finished trial takes no more attributes: the export explains this failure from the retry's link.
        frozen = rdb.get_trial(trial_id)
        optuna.storages.RetryFailedTrialCallback(max_retry=spec.execution.max_retry)(study, frozen)
        failed.append(frozen.number)
        log(f"trial {frozen.number} ({frozen.user_attrs.get('label', '?')}) lost its worker: queued again")
    return failed


def _claim_waiting(study: Any) -> Any | None:
    import optuna
    from optuna.trial import TrialState

    rdb = _rdb(study)
    for ft in sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), key=lambda t: t.number):
        if transition(rdb, ft._trial_id, TrialState.WAITING, TrialState.RUNNING):
            return optuna.trial.Trial(study, ft._trial_id)
    return None


def _counts(study: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def objective_value(record: dict[str, Any], metric: str) -> float:
    """The value of one objective in a trial record (NaN when missing: Optuna then fails the trial)."""
    if metric in ("mean_accuracy", "params_ratio", "params", "bytes", "size_reduction"):
        value = record.get(metric)
    elif metric in ("decode_ms", "latency_change", "ideal_latency_change"):
        value = (record.get("efficiency") or {}).get(metric)
    elif metric == "perplexity":
        value = (record["metrics"].get("wikitext") or {}).get("value")
    else:
        value = (record["metrics"].get(metric) or {}).get("value")
    return float(value) if value is not None else math.nan


def relative_to_dense(record: dict[str, Any], dense: dict[str, Any] | None) -> None:
    """Latency and energy changes vs the dense record (fractions; negative = faster / less energy)."""
    eff, deff = record.get("efficiency"), (dense or {}).get("efficiency")
    if not eff or not deff or eff.get("baseline"):  # the worker's own dense baseline is better: same process
        return
    eff["decode_ms_dense"] = deff.get("decode_ms")
    if eff.get("decode_ms") is not None and deff.get("decode_ms"):
        eff["latency_change"] = eff["decode_ms"] / deff["decode_ms"] - 1.0
    if eff.get("energy_j") is not None and deff.get("energy_j"):
        eff["energy_change"] = eff["energy_j"] / deff["energy_j"] - 1.0


def _sampler(spec: StudySpec, index: int) -> Any:
    import optuna

    search = spec.search
    if search is None:
        return None
    seed = search.seed + index  # distinct streams per worker: equal seeds would propose equal trials
    constraints = None
    if search.max_params_ratio is not None:
        def constraints(frozen: Any) -> list[float]:
            return list(frozen.user_attrs.get("constraint", [0.0]))
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, multivariate=True)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=search.population_size,
                                         constraints_func=constraints)


def search_point(trial: Any, spec: StudySpec, n_layers: int, roles: list[str]) -> DesignPoint:
    """The design point a search trial's parameters describe: layer subset x tensor mask x rank (x method)."""
    search = spec.search
    assert search is not None
    layers = [i for i in range(n_layers) if trial.suggest_categorical(f"layer_{i}", [False, True])]
    tensors = [r for r in roles if trial.suggest_categorical(f"tensor_{r}", [False, True])]
    rank = trial.suggest_categorical("rank", list(search.ranks))
    method = (trial.suggest_categorical("method", list(search.methods)) if len(search.methods) > 1
              else search.methods[0])
    label = f"L{{{','.join(map(str, layers))}}} T{{{','.join(tensors)}}} r={rank}"
    if not layers or not tensors:
        return DesignPoint("search", label + " (dense)", None, "dense")
    return DesignPoint("search", label, len(layers), "decompose",
                       plan={"method": method, "rank": rank, "layers": layers, "tensors": tensors})


@dataclass
class WorkerResult:
    name: str
    worker: str
    completed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    abandoned: int | None = None


def worker_id(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:w{index}"


def work(storage_url: str, name: str | None, *, index: int = 0, progress: bool = False,
         log: Callable[[str], None] | None = None, on_trial: Callable[[dict[str, Any]], None] | None = None,
         runner: Any = None, stop: threading.Event | None = None) -> WorkerResult:
    """Run trials of a study until none are left (see the module docstring); returns what this worker did."""
    from optuna.trial import TrialState

    from rankwise.models.adapters import adapter_for
    from rankwise.studies.trial import PointRunner

    log = log or (lambda _m: None)
    study, spec, points = load_study(storage_url, name, heartbeat=True)
    me = worker_id(index)
    result = WorkerResult(name=study.study_name, worker=me)
    if runner is None:
        runner = PointRunner(spec, points, progress=progress, log=log)
    runner.check_data()
    dense = study.user_attrs.get("dense")
    if dense is None:
        log("measuring the dense model (once per study)")
        dense = json_safe({**runner.run_dense(), "worker": me})
        study.set_user_attr("dense", dense)
    adapter = adapter_for(runner.model)
    n_layers, roles = adapter.n_layers, list(adapter.roles)
    interval = spec.execution.heartbeat_interval
    rdb = _rdb(study)
    while stop is None or not stop.is_set():
        fail_stale(study, spec, log)
        trial = _claim_waiting(study)
        if trial is None and spec.search is not None:
            counts = _counts(study)
            started = sum(v for k, v in counts.items() if k != "FAIL")
            if started < spec.search.n_trials:
                with warnings.catch_warnings():  # "heartbeat is meant for optimize()": this loop beats itself
                    warnings.simplefilter("ignore", UserWarning)
                    trial = study.ask()
        if trial is None:
            if _counts(study).get("RUNNING", 0):
                time.sleep(min(2.0, interval))
                continue
            break
        number = trial.number
        try:
            with Heartbeat(rdb, trial._trial_id, interval):
                trial.set_user_attr("worker", me)
                trial.set_user_attr("error", None)  # a retry copies its predecessor's attributes
                if spec.search is not None:
                    point = search_point(trial, spec, n_layers, roles)
                else:
                    point = points[trial.suggest_int(POINT_PARAM, 0, len(points) - 1)]
                trial.set_user_attr("sweep", point.sweep)
                trial.set_user_attr("label", point.label)
                log(f"trial {number}: {point.sweep} {point.label}")
                if point.kind == "dense":
                    record = {**{k: v for k, v in dense.items() if k not in ("worker", "seconds")},
                              "sweep": point.sweep, "label": point.label, "seconds": 0.0,
                              "note": "no layer or no tensor selected: the dense model (its record reused)"}
                else:
                    record = runner.run_point(point)
                relative_to_dense(record, dense)
                record = json_safe(record)
                values = [objective_value(record, o.metric) for o in spec.objectives]
                trial.set_user_attr("record", record)
                if spec.search is not None and spec.search.max_params_ratio is not None:
                    trial.set_user_attr("constraint", [record["params_ratio"] - spec.search.max_params_ratio])
                if any(math.isnan(v) for v in values):
                    missing = [o.metric for o, v in zip(spec.objectives, values, strict=True) if math.isnan(v)]
                    raise RankwiseError(f"objective {', '.join(missing)} has no value for this point")
            study.tell(trial, values)
            result.completed.append(number)
            if on_trial is not None:
                on_trial(record)
        except KeyboardInterrupt:
            _abandon(study, trial, spec, "interrupted by the user (Ctrl-C)")
            result.abandoned = number
            raise StudyInterrupted(number, trial.user_attrs.get("label") if hasattr(trial, "user_attrs") else None,
                                   result) from None
        except Exception as exc:
            message = first_line(exc)
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", f"{type(exc).__name__}: {message}")
            try:
                study.tell(trial, state=TrialState.FAIL)
            except Exception as tell_exc:  # e.g. declared lost by another worker meanwhile
                log(f"trial {number}: could not record the failure ({first_line(tell_exc)})")
            result.failed.append(number)
            log(f"trial {number} failed: {type(exc).__name__}: {message}")
    return result


class StudyInterrupted(Exception):
    """Ctrl-C during a trial: the trial was marked FAIL and queued again."""

    def __init__(self, number: int, label: str | None, result: WorkerResult) -> None:
        self.number, self.label, self.result = number, label, result
        self.note = (f"abandoned trial {number}" + (f" ({label})" if label else "")
                     + "; it is queued again and runs on the next start")
        super().__init__(f"interrupted: {self.note}")


def _abandon(study: Any, trial: Any, spec: StudySpec, reason: str) -> None:
    import optuna
    from optuna.trial import TrialState

    rdb = _rdb(study)
    with contextlib.suppress(Exception):
        rdb.set_trial_user_attr(trial._trial_id, "error", reason)
    if transition(rdb, trial._trial_id, TrialState.RUNNING, TrialState.FAIL):
        optuna.storages.RetryFailedTrialCallback(max_retry=None)(study, rdb.get_trial(trial._trial_id))


# --------------------------------------------------------------------------------------------- running


def study_name_for(spec: StudySpec, name: str | None) -> str:
    if name:
        return name
    if spec.name:
        return spec.name
    raise RankwiseError("the study needs a name: set name: in the spec or pass --name")


def spawn_worker(storage_url: str, name: str, index: int, quiet: bool = True) -> subprocess.Popen:
    """A ``rankwise study worker`` process for the same study."""
    cmd = [sys.executable, "-m", "rankwise", "study", "worker", "--storage", storage_url, "--name", name,
           "--index", str(index)]
    if quiet:
        cmd.append("--quiet")
    return subprocess.Popen(cmd)


def run_study(spec: StudySpec | str | os.PathLike[str] | dict, storage: str = "sqlite:///study.db",
              workers: int = 1, *, name: str | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None,
              on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Create (or resume) the study and run it with ``workers`` workers (this process plus ``workers - 1``
    subprocesses); returns the results document (:func:`rankwise.studies.export.study_document`).
    ``workers=0`` only creates the study and queues its points, for ``rankwise study worker`` processes."""
    from rankwise.studies.export import study_document
    from rankwise.studies.spec import load_spec
    from rankwise.studies.trial import PointRunner, check_study_data

    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    if workers < 0:
        raise RankwiseError(f"--workers must be 0 or more, got {workers}")
    study_name = study_name_for(spec, name)
    check_existing(spec, storage, study_name)  # unreachable storage, foreign spec, missing data: before
    check_study_data(spec)                     # the model loads
    runner = PointRunner(spec, [], progress=progress, log=log)
    _study, points, _ = create_or_resume(spec, storage, study_name, runner.model)
    if workers == 0:
        return study_document(storage, study_name)
    if runner.reuse and points:
        runner._precompute_stats(points)
    children = [spawn_worker(storage, study_name, i) for i in range(1, workers)]
    try:
        work(storage, study_name, index=0, progress=progress, log=log, on_trial=on_trial, runner=runner)
    finally:
        for child in children:
            with contextlib.suppress(Exception):
                child.wait()
    bad = [c.returncode for c in children if c.returncode not in (0, None)]
    if bad:
        (log or print)(f"{len(bad)} worker process(es) exited with an error (codes {bad}); "
                       "`rankwise study status` shows the trials")
    return study_document(storage, study_name)

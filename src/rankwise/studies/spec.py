"""The study spec: what to measure (model, tasks, perplexity, efficiency, objectives) and where to look
(a grid of design points or a search).

Written in YAML (``yaml.safe_load``) and validated here, by hand, so every problem is one line naming the
field the user wrote, e.g. ``spec.tasks[0].limit: must be a positive integer``. Validation that needs no
model (shapes of fields, known task names, known presets) happens at load time; what needs the model
(layers in range, roles that exist) happens when the points are expanded against its adapter.

The *spec hash* identifies a study's science: two specs with the same hash measure the same things on the
same points, so their trials may share one Optuna study. The ``execution`` section (heartbeat, cache sizes,
reuse switches) is left out of the hash: it changes how fast results come, never what they are.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rankwise.errors import RankwiseError

SPEC_ERROR_PREFIX = "spec"
SAMPLERS = ("nsga2", "tpe")
DIRECTIONS = ("maximize", "minimize")
#: Objective metrics every trial has (task names and ``perplexity`` are added per spec).
BASE_OBJECTIVES = ("mean_accuracy", "params_ratio", "params", "bytes", "size_reduction")
EFFICIENCY_OBJECTIVES = ("decode_ms", "latency_change", "ideal_latency_change")
PRESETS = ("layer-count", "layer-removal", "tensor-sensitivity", "rank-sweep", "layer-density", "single-layer")

_TOP_KEYS = {"name", "model", "dtype", "device", "threads", "seed", "tasks", "perplexity", "efficiency",
             "objectives", "grid", "search", "execution", "calibration"}


class SpecError(RankwiseError):
    """A study spec that is malformed; the message names the field."""


def _err(path: str, message: str) -> SpecError:
    return SpecError(f"{SPEC_ERROR_PREFIX}.{path}: {message}" if path else f"{SPEC_ERROR_PREFIX}: {message}")


def _pos_int(value: Any, path: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _err(path, f"must be a positive integer, got {value!r}")
    return value


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(path, f"must be an integer, got {value!r}")
    return value


def _str(value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(path, f"must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise _err(path, f"'{value}' is not one of {', '.join(choices)}")
    return value


def _mapping(value: Any, path: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _err(path, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise _err(f"{path}.{unknown[0]}" if path else unknown[0],
                   f"unknown field (known: {', '.join(sorted(known))})")
    return dict(value)


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark with its subset: the first ``limit`` items or a seeded ``sample`` (same every trial)."""

    name: str
    limit: int | None = None
    sample: int | None = None
    seed: int = 1234
    shots: int | None = None
    pooled: bool = False  # a group task's sample drawn from all its members' items together (MMLU)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "limit": self.limit, "sample": self.sample, "seed": self.seed,
               "shots": self.shots}
        if self.pooled:  # only when set: specs written before the field keep their identity (hash)
            out["pooled"] = True
        return out


@dataclass(frozen=True)
class PerplexitySpec:
    """WikiText-2 token-level perplexity on a fixed slice: the first ``windows`` windows of ``seq_len``."""

    windows: int = 4
    seq_len: int = 512

    def to_dict(self) -> dict[str, Any]:
        return {"windows": self.windows, "seq_len": self.seq_len}


@dataclass(frozen=True)
class EfficiencySpec:
    """Decode latency with a short protocol: batch 1, ``new_tokens`` after ``context``, median of ``repeats``."""

    decode: bool = True
    context: int = 128
    new_tokens: int = 32
    repeats: int = 5
    energy: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"decode": self.decode, "context": self.context, "new_tokens": self.new_tokens,
                "repeats": self.repeats, "energy": self.energy}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": self.direction}


@dataclass(frozen=True)
class SearchSpec:
    """A multi-objective search over layer subset x tensor mask x rank (the paper's design space)."""

    sampler: str = "nsga2"
    n_trials: int = 20
    seed: int = 0
    ranks: tuple[Any, ...] = (1,)
    methods: tuple[str, ...] = ("tucker",)
    max_params_ratio: float | None = None
    population_size: int = 10

    def to_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "n_trials": self.n_trials, "seed": self.seed, "ranks": list(self.ranks),
                "methods": list(self.methods),
                "budget": {"max_params_ratio": self.max_params_ratio} if self.max_params_ratio is not None else {},
                "population_size": self.population_size}


@dataclass(frozen=True)
class ExecutionSpec:
    """How workers run (not part of the spec hash): heartbeat, retries, reuse switches, cache sizes."""

    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 3
    reuse: bool = True
    factor_cache_mb: int = 1024
    hidden_cache_mb: int = 2048

    def to_dict(self) -> dict[str, Any]:
        return {"heartbeat_interval": self.heartbeat_interval, "grace_period": self.grace_period,
                "max_retry": self.max_retry, "reuse": self.reuse, "factor_cache_mb": self.factor_cache_mb,
                "hidden_cache_mb": self.hidden_cache_mb}


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec. ``grid`` items are raw (checked) dicts expanded by :mod:`.points`."""

    name: str | None
    model: str
    dtype: str
    device: str
    threads: int
    tasks: tuple[TaskSpec, ...]
    perplexity: PerplexitySpec | None
    efficiency: EfficiencySpec | None
    objectives: tuple[Objective, ...]
    grid: tuple[dict[str, Any], ...] | None
    search: SearchSpec | None
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    calibration: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return "search" if self.search is not None else "grid"

    def science_dict(self) -> dict[str, Any]:
        """Everything that decides the numbers (hashed; stored with the study)."""
        return {
            "model": self.model, "dtype": self.dtype, "device": self.device, "threads": self.threads,
            "tasks": [t.to_dict() for t in self.tasks],
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "efficiency": self.efficiency.to_dict() if self.efficiency else None,
            "objectives": [o.to_dict() for o in self.objectives],
            "grid": [copy.deepcopy(g) for g in self.grid] if self.grid is not None else None,
            "search": self.search.to_dict() if self.search else None,
            "calibration": self.calibration,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.science_dict(), "execution": self.execution.to_dict()}

    @property
    def hash(self) -> str:
        text = json.dumps(self.science_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def objective_names(self) -> list[str]:
        return [o.metric for o in self.objectives]


# --------------------------------------------------------------------------------------------- parsing


def _task(value: Any, path: str) -> TaskSpec:
    from rankwise.evaluation.registry import get_task

    if isinstance(value, str):
        value = {"name": value}
    data = _mapping(value, path, {"name", "limit", "sample", "seed", "shots", "pooled"})
    name = _str(data.get("name"), f"{path}.name")
    try:
        get_task(name)
    except RankwiseError as exc:
        raise _err(f"{path}.name", str(exc)) from None
    limit = _pos_int(data.get("limit"), f"{path}.limit", allow_none=True)
    sample = _pos_int(data.get("sample"), f"{path}.sample", allow_none=True)
    if limit is not None and sample is not None:
        raise _err(path, "limit and sample are mutually exclusive: choose one")
    seed = _int(data.get("seed", 1234), f"{path}.seed")
    shots = data.get("shots")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise _err(f"{path}.shots", f"must be a non-negative integer, got {shots!r}")
    pooled = data.get("pooled", False)
    if not isinstance(pooled, bool):
        raise _err(f"{path}.pooled", f"must be true or false, got {pooled!r}")
    if pooled and sample is None:
        raise _err(f"{path}.pooled", "needs sample: it pools a seeded sample over a group's members")
    return TaskSpec(name=name, limit=limit, sample=sample, seed=seed, shots=shots, pooled=pooled)


def _objectives(value: Any, allowed: list[str], default: list[Objective]) -> tuple[Objective, ...]:
    if value is None:
        return tuple(default)
    if not isinstance(value, list) or not value:
        raise _err("objectives", "must be a non-empty list of {metric, direction}")
    out = []
    for i, item in enumerate(value):
        path = f"objectives[{i}]"
        data = _mapping(item, path, {"metric", "direction"})
        metric = _str(data.get("metric"), f"{path}.metric")
        if metric not in allowed:
            raise _err(f"{path}.metric", f"'{metric}' is not a metric of this study (available: {', '.join(allowed)})")
        direction = _str(data.get("direction", "maximize" if metric == "mean_accuracy" else "minimize"),
                         f"{path}.direction", DIRECTIONS)
        out.append(Objective(metric, direction))
    if len({o.metric for o in out}) != len(out):
        raise _err("objectives", "a metric appears twice")
    return tuple(out)


def _search(value: Any) -> SearchSpec:
    from rankwise.decomposition import available_methods
    from rankwise.design.ranks import parse_rank

    data = _mapping(value, "search", {"sampler", "n_trials", "seed", "ranks", "methods", "budget",
                                      "population_size"})
    sampler = _str(data.get("sampler", "nsga2"), "search.sampler", SAMPLERS)
    n_trials = _pos_int(data.get("n_trials", 20), "search.n_trials")
    seed = _int(data.get("seed", 0), "search.seed")
    ranks = data.get("ranks", [1])
    if not isinstance(ranks, list) or not ranks:
        raise _err("search.ranks", "must be a non-empty list of ranks")
    for i, r in enumerate(ranks):
        try:
            parse_rank(r, f"spec.search.ranks[{i}]")
        except RankwiseError as exc:
            raise SpecError(str(exc)) from None
    methods = data.get("methods", ["tucker"])
    if not isinstance(methods, list) or not methods:
        raise _err("search.methods", "must be a non-empty list of method names")
    for i, m in enumerate(methods):
        _str(m, f"search.methods[{i}]", tuple(available_methods()))
    budget = _mapping(data.get("budget") or {}, "search.budget", {"max_params_ratio"})
    ratio = budget.get("max_params_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1):
        raise _err("search.budget.max_params_ratio", f"must be a number in (0, 1], got {ratio!r}")
    pop = _pos_int(data.get("population_size", 10), "search.population_size")
    if pop is not None and pop < 2:
        raise _err("search.population_size", "must be at least 2")
    return SearchSpec(sampler=sampler, n_trials=n_trials or 20, seed=seed, ranks=tuple(ranks),
                      methods=tuple(methods), max_params_ratio=None if ratio is None else float(ratio),
                      population_size=pop or 10)


def _grid(value: Any) -> tuple[dict[str, Any], ...]:
    from rankwise.studies.points import check_grid_item

    if not isinstance(value, list) or not value:
        raise _err("grid", "must be a non-empty list of presets ({preset: NAME, ...}) or axes ({axes: {...}})")
    return tuple(check_grid_item(item, f"grid[{i}]") for i, item in enumerate(value))


def parse_spec(data: Any, default_name: str | None = None) -> StudySpec:
    """A validated :class:`StudySpec` from a mapping (the parsed YAML)."""
    from rankwise.models.zoo import DTYPES

    data = _mapping(data, "", _TOP_KEYS)
    name = data.get("name", default_name)
    if name is not None:
        name = _str(name, "name")
    model = _str(data.get("model", "smollm2-135m"), "model")
    dtype = _str(data.get("dtype", "float32"), "dtype", tuple(DTYPES))
    device = _str(data.get("device", "cpu"), "device")
    threads = _pos_int(data.get("threads", 1), "threads") or 1
    raw_tasks = data.get("tasks") or []
    if not isinstance(raw_tasks, list):
        raise _err("tasks", "must be a list of task names or {name, limit|sample, seed}")
    tasks = tuple(_task(t, f"tasks[{i}]") for i, t in enumerate(raw_tasks))
    if len({t.name for t in tasks}) != len(tasks):
        raise _err("tasks", "a task appears twice")
    perplexity = None
    if data.get("perplexity") is not None:
        p = data["perplexity"]
        if p is True:
            p = {}
        pdata = _mapping(p, "perplexity", {"windows", "seq_len"})
        seq_len = _pos_int(pdata.get("seq_len", 512), "perplexity.seq_len") or 512
        if seq_len < 2:
            raise _err("perplexity.seq_len", "must be at least 2 tokens")
        perplexity = PerplexitySpec(windows=_pos_int(pdata.get("windows", 4), "perplexity.windows") or 4,
                                    seq_len=seq_len)
        if any(t.name in ("wikitext", "wikitext_token") for t in tasks):
            raise _err("perplexity", "given twice: as perplexity and as a wikitext task; keep one")
    if not tasks and perplexity is None:
        raise _err("tasks", "a study needs at least one task or perplexity to measure")
    efficiency = None
    if data.get("efficiency") not in (None, False):
        e = data["efficiency"]
        if e is True:
            e = {}
        edata = _mapping(e, "efficiency", {"decode", "context", "new_tokens", "repeats", "energy"})
        for key in ("decode", "energy"):
            if key in edata and not isinstance(edata[key], bool):
                raise _err(f"efficiency.{key}", f"must be true or false, got {edata[key]!r}")
        efficiency = EfficiencySpec(
            decode=edata.get("decode", True),
            context=_pos_int(edata.get("context", 128), "efficiency.context") or 128,
            new_tokens=_pos_int(edata.get("new_tokens", 32), "efficiency.new_tokens") or 32,
            repeats=_pos_int(edata.get("repeats", 5), "efficiency.repeats") or 5,
            energy=edata.get("energy", True))
    allowed = list(BASE_OBJECTIVES) + [t.name for t in tasks]
    if perplexity is not None:
        allowed.append("perplexity")
    if efficiency is not None and efficiency.decode:
        allowed += list(EFFICIENCY_OBJECTIVES)
    accuracy_tasks = [t for t in tasks if t.name not in ("wikitext", "wikitext_token", "lambada_openai")]
    first = (Objective("mean_accuracy", "maximize") if accuracy_tasks
             else Objective("perplexity" if perplexity else tasks[0].name, "minimize"))
    objectives = _objectives(data.get("objectives"), allowed, [first, Objective("params_ratio", "minimize")])
    has_grid, has_search = data.get("grid") is not None, data.get("search") is not None
    if has_grid == has_search:
        raise _err("grid", "give either grid (a list of presets/axes) or search, not both and not neither")
    grid = _grid(data["grid"]) if has_grid else None
    search = _search(data["search"]) if has_search else None
    ex = _mapping(data.get("execution") or {}, "execution",
                  {"heartbeat_interval", "grace_period", "max_retry", "reuse", "factor_cache_mb",
                   "hidden_cache_mb"})
    interval = _pos_int(ex.get("heartbeat_interval", 10), "execution.heartbeat_interval") or 10
    grace = _pos_int(ex.get("grace_period", max(30, 3 * interval)), "execution.grace_period") or 30
    if grace <= interval:
        raise _err("execution.grace_period", f"must be longer than heartbeat_interval ({interval} s)")
    reuse = ex.get("reuse", True)
    if not isinstance(reuse, bool):
        raise _err("execution.reuse", f"must be true or false, got {reuse!r}")
    execution = ExecutionSpec(
        heartbeat_interval=interval, grace_period=grace,
        max_retry=_pos_int(ex.get("max_retry", 3), "execution.max_retry") or 3, reuse=reuse,
        factor_cache_mb=_pos_int(ex.get("factor_cache_mb", 1024), "execution.factor_cache_mb") or 1024,
        hidden_cache_mb=_pos_int(ex.get("hidden_cache_mb", 2048), "execution.hidden_cache_mb") or 2048)
    calibration = data.get("calibration")
    if calibration is not None:
        calibration = _mapping(calibration, "calibration", {"dataset", "n_samples", "seq_len", "seed"})
    return StudySpec(name=name, model=model, dtype=dtype, device=device, threads=threads, tasks=tasks,
                     perplexity=perplexity, efficiency=efficiency, objectives=objectives, grid=grid,
                     search=search, execution=execution, calibration=calibration)


def load_spec(source: str | Path | Mapping[str, Any]) -> StudySpec:
    """A validated spec from a YAML file path or a mapping; every problem is one ``spec.<field>: ...`` line."""
    if isinstance(source, Mapping):
        return parse_spec(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"study spec {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"study spec {path} is not UTF-8 text (offset {exc.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"study spec {path}: not valid YAML{where}: {problem}") from None
    if data is None:
        raise SpecError(f"study spec {path}: empty file")
    return parse_spec(data, default_name=path.stem)


def spec_from_stored(data: Mapping[str, Any], name: str | None) -> StudySpec:
    """The spec a study stored (its ``to_dict()``), validated again."""
    raw = {k: v for k, v in data.items() if v is not None and k in _TOP_KEYS}
    raw["name"] = name
    if raw.get("search"):
        raw["search"] = {k: v for k, v in raw["search"].items() if v != {} or k != "budget"}
    return parse_spec(raw)

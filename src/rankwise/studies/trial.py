"""Measuring one design point on a loaded model, and putting the model back afterwards.

A :class:`PointRunner` belongs to one worker. It holds the model (loaded once), and everything a sweep
would otherwise recompute per trial:

* the dense modules: a trial swaps factorized layers (or a shorter block list) in and :meth:`restore`
  swaps the very same dense module objects back, so the model is bit-identical to the loaded one and
  nothing is reloaded;
* decomposed factors by (module, method, rank, force, fold): a target decomposed once is reused by every
  later trial that asks for it (the layer-count sweep's n=6 shares targets with n=3 only where the
  layer sets overlap; a rank sweep repeated over studies shares all of them);
* calibration statistics for every target any point may need, collected (or read from the on-disk cache)
  once per worker instead of once per trial;
* what the tasks derive from their data and the tokenizer (parsed documents, WikiText-2's token ids):
  once per worker, through :attr:`EvalOptions.derived`;
* the dense model's size and decode bytes, for ratios and the ideal latency change.

Every metric is deterministic: evaluation uses fixed item subsets, the worker fixes its thread count
(``spec.threads``), and factors are computed from an aligned copy of the weight, so a trial killed and
retried, or run by another worker, gives identical numbers. Only wall-clock measurements (decode latency,
energy, seconds) vary, and they are stored as such.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rankwise.decomposition.removal import remove_blocks, restore_blocks
from rankwise.errors import RankwiseError
from rankwise.evaluation.registry import EvalOptions
from rankwise.evaluation.results import TaskResult
from rankwise.studies.hidden import HiddenStateCache
from rankwise.studies.points import DesignPoint
from rankwise.studies.spec import StudySpec

#: Task metric used as the task's headline value, in order of preference.
PRIMARY_METRICS = ("acc", "exact_match", "exact_match_strict", "mc2", "spearman", "token_perplexity",
                   "word_perplexity", "perplexity")
ACCURACY_METRICS = ("acc", "exact_match", "exact_match_strict")
PERPLEXITY_KEY = "wikitext"


def primary_metric(result: TaskResult) -> str:
    for name in PRIMARY_METRICS:
        if name in result.metrics:
            return name
    return next(iter(result.metrics))


def _chance(result: TaskResult, metric: str) -> float | None:
    if metric == "spearman":
        return 0.0
    if metric != "acc":
        return None
    counts = [len(s["choices"]) for s in result.samples if isinstance(s.get("choices"), list) and s["choices"]]
    return sum(1.0 / c for c in counts) / len(counts) if counts else None


def _protocol_text(result: TaskResult) -> str:
    p = result.protocol
    parts = []
    if "shots" in p:
        parts.append(f"{str(p['shots']).split(' ')[0]}-shot")
    if "seq_len" in p:
        parts.append(f"token-level, seq_len {p['seq_len']}")
    if "subset" in p:
        parts.append(str(p["subset"]))
    return ", ".join(parts) or "see protocol"


def metric_entry(result: TaskResult) -> dict[str, Any]:
    """One task's result in the study schema: headline metric, value, stderr, n, the others, chance, protocol."""
    metric = primary_metric(result)
    entry: dict[str, Any] = {"metric": metric, "value": result.metrics[metric],
                             "stderr": result.stderr.get(metric), "n": result.n}
    for name, value in result.metrics.items():
        if name != metric:
            entry[name] = value
            entry[f"{name}_stderr"] = result.stderr.get(name)
    entry["chance"] = _chance(result, metric)
    entry["protocol"] = _protocol_text(result)
    return entry


def mean_accuracy(metrics: dict[str, dict[str, Any]]) -> float | None:
    values = [m["value"] for m in metrics.values() if m.get("metric") in ACCURACY_METRICS and m["value"] is not None]
    return sum(values) / len(values) if values else None


class FactorCache:
    """Factorized modules (and their target reports) by (module, method, rank, force, fold), LRU by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[nn.Module | None, Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> tuple[nn.Module | None, Any] | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0], item[1]

    def put(self, key: tuple, module: nn.Module | None, report: Any) -> None:
        size = 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())
        if size > self.max_bytes:
            return
        self._items[key] = (module, report, size)
        self.bytes += size
        while self.bytes > self.max_bytes and self._items:
            _, (_, _, s) = self._items.popitem(last=False)
            self.bytes -= s


class PointRunner:
    """Evaluates design points on one loaded model (see the module docstring)."""

    def __init__(self, spec: StudySpec, points: Sequence[DesignPoint], *, reuse: bool | None = None,
                 progress: bool = False, log: Callable[[str], None] | None = None) -> None:
        from rankwise.decomposition.apply import model_size

        self.spec = spec
        self.reuse = spec.execution.reuse if reuse is None else reuse
        self.progress = progress
        self.log = log or (lambda _msg: None)
        torch.set_num_threads(spec.threads)
        self.loaded_at = time.perf_counter()
        self._load()
        self.dense_params, self.dense_bytes = model_size(self.model)
        self.dense_decode_bytes = self._decode_bytes()
        self.factors = FactorCache(spec.execution.factor_cache_mb * 2**20 if self.reuse else 0)
        self.hidden = HiddenStateCache(self.model, spec.execution.hidden_cache_mb * 2**20) if self.reuse else None
        #: task documents and token ids, derived from the data and the tokenizer once per worker (reuse only)
        self.derived: dict[tuple[Any, ...], Any] | None = {} if self.reuse else None
        self.stats: dict[str, Any] | None = None
        self.calibration_info: dict[str, Any] | None = None
        if self.reuse:
            self._precompute_stats(points)
        self.counter = None
        self.energy_reason = None
        if spec.efficiency is not None and spec.efficiency.decode:
            if spec.efficiency.energy:
                from rankwise.efficiency.energy import find_counter

                self.counter, reason = find_counter(spec.device)
                self.energy_reason = None if self.counter is not None else reason
            else:
                self.energy_reason = "energy not requested (efficiency.energy: false)"

    # --- model ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        from rankwise.models import load

        loaded = load(self.spec.model, dtype=self.spec.dtype, device=self.spec.device)
        self.model, self.tokenizer, self.info = loaded.model, loaded.tokenizer, loaded.info
        self.model.eval()

    def _decode_bytes(self) -> int | None:
        if self.spec.efficiency is None:
            return None
        from rankwise.efficiency.ideal import decode_bytes

        try:
            return decode_bytes(self.model, self.spec.efficiency.context).total
        except Exception:  # encoders have no decode step
            return None

    def _calibration_config(self) -> Any:
        from rankwise.calibration.data import CalibrationConfig

        return CalibrationConfig(**(self.spec.calibration or {}))

    def _precompute_stats(self, points: Sequence[DesignPoint]) -> None:
        """Calibration statistics for every target a data-aware point may decompose, once per worker."""
        from rankwise.decomposition import get_method
        from rankwise.decomposition.apply import gather_stats, resolve_targets, stats_request

        request: dict[str, frozenset[str]] = {}
        plans = [p.plan for p in points if p.kind == "decompose" and p.plan]
        if self.spec.search is not None:
            plans += [{"layers": "all", "tensors": "all", "method": m, "rank": 1} for m in self.spec.search.methods]
        for plan in plans:
            _, chosen = resolve_targets(self.model, _as_plan(plan))
            methods = {spec.method: get_method(spec.method) for _, spec in chosen}
            for name, fields in stats_request(chosen, methods).items():
                request[name] = request.get(name, frozenset()) | fields
        if request:
            self.log(f"calibration statistics for {len(request)} targets (cached on disk)")
            self.stats, self.calibration_info, _ = gather_stats(
                self.model, request, self._calibration_config(), self.tokenizer, True, self.progress)

    # --- measuring --------------------------------------------------------------------------------------
    def options(self, limit: int | None, sample: int | None, seed: int, shots: int | None = None,
                seq_len: int | None = None, *, pooled: bool = False) -> EvalOptions:
        return EvalOptions(limit=limit, sample=sample, seed=seed, shots=shots, seq_len=seq_len,
                           progress=self.progress, pooled=pooled, derived=self.derived)

    def check_data(self) -> None:
        check_study_data(self.spec)

    def measure_metrics(self) -> dict[str, dict[str, Any]]:
        from rankwise.evaluation.runner import evaluate

        metrics: dict[str, dict[str, Any]] = {}
        for task in self.spec.tasks:
            result = evaluate(self.model, self.tokenizer, [task.name],
                              self.options(task.limit, task.sample, task.seed, task.shots, pooled=task.pooled))[0]
            metrics[task.name] = metric_entry(result)
        if self.spec.perplexity is not None:
            p = self.spec.perplexity
            result = evaluate(self.model, self.tokenizer, ["wikitext_token"],
                              self.options(p.windows, None, 1234, seq_len=p.seq_len))[0]
            metrics[PERPLEXITY_KEY] = metric_entry(result)
        return metrics

    def measure_efficiency(self) -> dict[str, Any] | None:
        eff = self.spec.efficiency
        if eff is None:
            return None
        from rankwise.efficiency.ideal import decode_bytes

        out: dict[str, Any] = {"decode_ms": None, "decode_ms_dense": None, "latency_change": None,
                               "ideal_latency_change": None, "energy_j": None, "energy_change": None,
                               "energy_reason": self.energy_reason,
                               "protocol": f"decode batch 1, {eff.new_tokens} tokens after {eff.context}, "
                                           f"{self.spec.threads} thread(s), median of {eff.repeats} "
                                           "(1 warm-up)"}
        if not eff.decode:
            return out
        timing = self._decode_timing()
        if "error" in timing:
            out["protocol"] = f"not measurable: {timing['error']}"
            return out
        out["decode_ms"] = timing["decode_ms"]
        out["decode_ms_iqr_pct"] = timing["iqr_pct"]
        if timing["energy_j"] is not None:
            out["energy_j"] = timing["energy_j"]
            out["energy_unit"] = "J per decoded token"
        if self.dense_decode_bytes:
            out["ideal_latency_change"] = decode_bytes(self.model, eff.context).total / self.dense_decode_bytes - 1.0
        return out

    def _decode_timing(self) -> dict[str, Any]:
        """Decode latency (median ms per token, IQR %) and energy per token of the model as it is now."""
        from rankwise.efficiency.timing import Workload, measure

        eff = self.spec.efficiency
        assert eff is not None
        w = Workload("decode", 1, eff.context, eff.new_tokens)
        try:
            res = measure({"m": self.model}, [w], repeats=eff.repeats, warmup=1, device=self.spec.device,
                          counter=self.counter, memory=False)[0]
        except RankwiseError as exc:
            return {"error": str(exc)}
        energy = res.energy.per_token if res.energy is not None else None
        return {"decode_ms": res.metric.median, "iqr_pct": res.metric.iqr_pct, "energy_j": energy}

    def add_dense_baseline(self, efficiency: dict[str, Any] | None) -> None:
        """Time the (restored) dense model now and put the trial's changes against it: the same worker, the
        same protocol, minutes apart at most, instead of a dense run made at another time by another worker
        (on a shared machine the load drifts by tens of percent over a study)."""
        if not efficiency or efficiency.get("decode_ms") is None:
            return
        base = self._decode_timing()
        if "error" in base:
            return
        efficiency["decode_ms_dense"] = base["decode_ms"]
        efficiency["latency_change"] = efficiency["decode_ms"] / base["decode_ms"] - 1.0
        if base["energy_j"] and efficiency.get("energy_j") is not None:
            efficiency["energy_change"] = efficiency["energy_j"] / base["energy_j"] - 1.0
        efficiency["baseline"] = "dense decode timed by this worker right after the trial's (same protocol)"

    def measure_all(self, first_layer: int | None = None, record_all: bool = False) -> dict[str, Any]:
        """Size, metrics and efficiency of the model as it is now. ``first_layer``: the lowest layer the
        current point changes (lets the hidden-state cache replay the dense blocks before it)."""
        from rankwise.decomposition.apply import model_size

        params, nbytes = model_size(self.model)
        session = (self.hidden.session(first_layer, record_all=record_all) if self.hidden is not None
                   else contextlib.nullcontext())
        with session:
            metrics = self.measure_metrics()
        return {"params": params, "params_ratio": params / self.dense_params,
                "size_reduction": 1.0 - params / self.dense_params, "bytes": nbytes, "metrics": metrics,
                "mean_accuracy": mean_accuracy(metrics), "efficiency": self.measure_efficiency()}

    # --- points -----------------------------------------------------------------------------------------
    def run_dense(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        record = {"sweep": "dense", "label": "dense", "x": None, "plan": None, "kind": "dense",
                  **self.measure_all(record_all=True), "decomposition": None}
        record["seconds"] = time.perf_counter() - t0
        return record

    def run_point(self, point: DesignPoint) -> dict[str, Any]:
        """Apply the point, measure, put the dense model back (always, also on error)."""
        t0 = time.perf_counter()
        if not self.reuse:
            self._load()  # the no-reuse baseline: a fresh model per trial, as separate runs would
        undo: Callable[[], None] | None = None
        timings: dict[str, float] = {}
        try:
            if point.kind == "remove":
                removal = remove_blocks(self.model, point.remove_layers or ())
                undo = lambda: restore_blocks(removal)  # noqa: E731
                report = None
            else:
                report, undo = self.apply_plan(point.plan or {})
            timings["apply"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            changed = [t["layer"] for t in (report or {}).get("targets", []) if not t.get("kept_dense")]
            measured = self.measure_all(first_layer=min(changed) if changed else None)
            timings["measure"] = time.perf_counter() - t1
        finally:
            if undo is not None:
                undo()
        self.add_dense_baseline(measured.get("efficiency"))
        record = {"sweep": point.sweep, "label": point.label, "x": point.x, **point_plan(point),
                  "kind": point.kind, **measured, "decomposition": report, "timings": timings,
                  "factor_cache": {"hits": self.factors.hits, "misses": self.factors.misses}}
        if self.hidden is not None:
            record["hidden_cache"] = {"layers": sorted(self.hidden.store), "bytes": self.hidden.bytes,
                                      "replayed_calls": self.hidden.replayed_calls,
                                      "skipped_block_calls": self.hidden.skipped_blocks}
        record["seconds"] = time.perf_counter() - t0
        return record

    def apply_plan(self, plan_dict: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
        """Decompose the plan's targets (factors from the cache where present); returns the report and the
        function that swaps the dense modules back."""
        from rankwise.decomposition.apply import (
            REPORT_ATTR,
            decompose,
            model_size,
            parse_fold,
            resolve_targets,
        )
        from rankwise.decomposition.report import DecompositionReport

        t0 = time.perf_counter()
        plan = _as_plan(plan_dict)
        fold = parse_fold(plan.fold)
        adapter, chosen = resolve_targets(self.model, plan)
        originals = {(i.layer, i.role): adapter.linear(i.layer, i.role) for i, _ in chosen}

        def undo() -> None:
            for (layer, role), module in originals.items():
                adapter.replace(layer, role, module)
            if hasattr(self.model, REPORT_ATTR):
                delattr(self.model, REPORT_ATTR)

        reports: dict[tuple[int, str], Any] = {}
        missing = []
        keys = {}
        try:
            for info, spec in chosen:
                key = (info.name, spec.method, str(spec.rank), spec.force, str(fold))
                keys[(info.layer, info.role)] = key
                hit = self.factors.get(key) if self.reuse else None
                if hit is None:
                    missing.append((info, spec))
                    continue
                module, rep = hit
                if module is not None:
                    adapter.replace(info.layer, info.role, module)
                reports[(info.layer, info.role)] = rep
            calib_info = self.calibration_info
            if missing:
                sub = _subplan(missing, fold)
                calibration = self.stats if self.stats is not None else self._calibration_config()
                rep = decompose(self.model, sub, calibration, tokenizer=self.tokenizer, progress=self.progress,
                                name=self.spec.model)
                calib_info = rep.calibration or calib_info
                for t in rep.targets:
                    reports[(t.layer, t.role)] = t
                    module = adapter.linear(t.layer, t.role)
                    if self.reuse:
                        self.factors.put(keys[(t.layer, t.role)], None if t.kept_dense else module, t)
        except BaseException:
            undo()
            raise
        params, nbytes = model_size(self.model)
        first = next(self.model.parameters())
        report = DecompositionReport(
            model=self.spec.model, plan=plan.to_dict(), fold=str(fold).lower(),
            targets=[reports[(i.layer, i.role)] for i, _ in chosen], params_before=self.dense_params,
            params_after=params, bytes_before=self.dense_bytes, bytes_after=nbytes,
            seconds=time.perf_counter() - t0, calibration=calib_info,
            dtype=str(first.dtype).removeprefix("torch."))
        out = report.to_dict()
        out["targets_from_cache"] = len(chosen) - len(missing)
        return out, undo


def check_study_data(spec: StudySpec) -> None:
    """Every task's data file exists: a one-line error naming the missing file before any model loads."""
    from rankwise.evaluation.runner import check_data, resolve_tasks

    names = [t.name for t in spec.tasks] + (["wikitext_token"] if spec.perplexity else [])
    check_data(resolve_tasks(names), EvalOptions())


def point_plan(point: DesignPoint) -> dict[str, Any]:
    return {"plan": point.to_dict()["plan"]}


def _as_plan(plan: dict[str, Any]) -> Any:
    from rankwise.design.plan import Plan

    return Plan.from_dict(plan)


def _subplan(chosen: Sequence[tuple[Any, Any]], fold: Any) -> dict[str, Any]:
    """A plan selecting exactly these (target, spec) pairs: a base rule for the first, one override each."""
    first_info, first_spec = chosen[0]
    plan: dict[str, Any] = {"method": first_spec.method, "rank": first_spec.rank.to_plain(),
                            "force": first_spec.force, "fold": fold, "layers": [first_info.layer],
                            "tensors": [first_info.role]}
    plan["overrides"] = [{"layers": [i.layer], "tensors": [i.role], "method": s.method, "rank": s.rank.to_plain(),
                          "force": s.force} for i, s in chosen[1:]]
    return plan


def median_or_none(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None

"""Bridge to lm-evaluation-harness (optional dependency ``lm-eval``, the ``harness`` extra).

``--harness lm-eval`` evaluates the *loaded model object* (also an in-memory decomposed one) with lm-eval's
``simple_evaluate`` and ``HFLM(pretrained=model, tokenizer=...)``. For the tasks rankwise defines, lm-eval
is pointed at the same local files: each task declares its binding next to its own data reading (lm-eval's
task YAML, the split, and the conversion of its file into the record layout of the Hugging Face dataset
lm-eval's task reads); :func:`write_local_tasks` loops over the registry, writes those records and a task
YAML that *includes lm-eval's own task file* (so prompts, choices, ``process_docs`` and metrics are
lm-eval's) with only the dataset swapped for ``dataset_path: json``. Other task names go to lm-eval's registry unchanged (they need network access).

The parity tests use the same conversion to compare rankwise with lm-eval item by item.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rankwise.errors import RankwiseError, first_line
from rankwise.evaluation.registry import EvalOptions, LmEvalBinding, get_task, task_names
from rankwise.evaluation.results import TaskResult
from rankwise.evaluation.sampling import select

LM_EVAL_VERSION = "0.4.13"
_MISSING = ("--harness lm-eval needs the optional dependency lm-eval: pip install 'rankwise[harness]' "
            f"(lm-eval=={LM_EVAL_VERSION})")


def import_lm_eval() -> Any:
    """The ``lm_eval`` package, or a one-line error saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise RankwiseError(_MISSING) from None
    return lm_eval


# --------------------------------------------------------------------------------------------- conversion


def local_tasks() -> dict[str, LmEvalBinding]:
    """Every registered task that lm-eval can run on the local data: name -> its binding (declared by the
    task next to its own data reading, :meth:`~rankwise.evaluation.registry.Task.lm_eval_binding`)."""
    table = {}
    for name in task_names():
        binding = get_task(name).lm_eval_binding()
        if binding is not None:
            table[name] = binding
    return table


def _groups() -> dict[str, list[str]]:
    """Registered group tasks (MMLU and its categories): group -> member tasks, as lm-eval aggregates them."""
    groups = {}
    for name in task_names():
        members = get_task(name).lm_eval_members()
        if members:
            groups[name] = list(members)
    return groups


def _tasks_root() -> Path:
    lm_eval = import_lm_eval()
    return Path(lm_eval.__file__).parent / "tasks"


def write_local_tasks(names: Sequence[str], options: EvalOptions, folder: Path) -> list[str]:
    """Write JSONL data and lm-eval task YAMLs for ``names`` into ``folder``; returns the names that are
    local (an MMLU group expands to its local subjects, with group YAMLs aggregating them as lm-eval does)."""
    table = local_tasks()
    groups = _groups()
    root = _tasks_root()
    folder.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    local: list[str] = []

    def write_task(name: str) -> None:
        if name in written:
            return
        spec = table[name]
        data_files = {}
        for split, rows in spec.records(options).items():
            path = folder / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            data_files[split] = str(path)
        config = {
            "include": str(root / spec.yaml),
            "task": name,
            "tag": "rankwise_local",
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files},
            "training_split": None,
            "validation_split": spec.split if spec.split == "validation" else None,
            "test_split": spec.split if spec.split == "test" else None,
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        written.add(name)

    def write_group(name: str) -> None:
        for member in groups[name]:
            if member in groups:
                write_group(member)
            else:
                write_task(member)
        config = {"group": name, "task": groups[name],
                  "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                  "metadata": {"version": 2}}
        (folder / f"_{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    for name in names:
        if name in groups:
            write_group(name)
            local.append(name)
        elif name in table:
            write_task(name)
            local.append(name)
    return local


# --------------------------------------------------------------------------------------------- running


def run_lm_eval(model: Any, tokenizer: Any, names: Sequence[str], options: EvalOptions,
                include_path: Path | None, include_defaults: bool,
                samples: dict[str, list[int]] | None = None, bootstrap_iters: int = 100000) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on an in-memory model; returns lm-eval's result dict."""
    import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_defaults)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size,
              max_length=options.seq_len)
    try:
        out = simple_evaluate(
            model=lm, tasks=list(names), num_fewshot=options.shots,
            limit=None if samples else options.limit, samples=samples,
            log_samples=True, task_manager=manager, bootstrap_iters=bootstrap_iters,
        )
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise RankwiseError(f"lm-eval failed: {first_line(exc)}") from None
    if out is None:
        raise RankwiseError("lm-eval returned no results")
    return out


def _sample_indices(names: Sequence[str], options: EvalOptions) -> dict[str, list[int]] | None:
    """``--sample`` as lm-eval's ``samples`` argument: the same seeded indices rankwise evaluates."""
    if options.sample is None:
        return None
    table, groups = local_tasks(), _groups()
    leaves: list[str] = []

    def expand(n: str) -> None:
        if n in groups:
            for m in groups[n]:
                expand(m)
        elif n in table:
            leaves.append(n)
        else:
            raise RankwiseError(f"--sample with --harness lm-eval needs local data; task {n} has none here")

    for n in names:
        expand(n)
    out = {}
    for leaf in leaves:
        spec = table[leaf]
        total = len(spec.records(options)[spec.split])
        out[leaf] = select(total, None, options.sample, options.seed).indices
    return out


def evaluate_with_lm_eval(model: Any, tokenizer: Any, names: Sequence[str], options: EvalOptions) -> list[TaskResult]:
    """Run the tasks through lm-eval (local data where rankwise has it) and return rankwise results."""
    import_lm_eval()
    with tempfile.TemporaryDirectory(prefix="rankwise-lm-eval-") as tmp:
        local = write_local_tasks(names, options, Path(tmp))
        remote = [n for n in names if n not in local]
        out = run_lm_eval(model, tokenizer, names, options, Path(tmp), include_defaults=bool(remote),
                          samples=_sample_indices(names, options))
    return [to_task_result(out, n, n in local, options) for n in names]


def _metric_pairs(entry: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr" in key or not isinstance(value, int | float):
            continue
        metric, filt = key.split(",", 1)
        metrics[metric] = float(value)
        se = entry.get(f"{metric}_stderr,{filt}")
        stderr[metric] = float(se) if isinstance(se, int | float) else None
    return metrics, stderr


def to_task_result(out: dict[str, Any], name: str, local: bool, options: EvalOptions) -> TaskResult:
    """One task (or group) of lm-eval's output as a :class:`TaskResult`, samples included."""
    entry = out.get("results", {}).get(name) or out.get("groups", {}).get(name)
    if entry is None:
        raise RankwiseError(f"lm-eval produced no result for task {name}")
    metrics, stderr = _metric_pairs(entry)
    members = out.get("group_subtasks", {}).get(name, [])
    subtasks = [to_task_result(out, m, local, options) for m in members]
    n_info = out.get("n-samples", {}).get(name, {})
    n = int(n_info.get("effective", 0)) if n_info else sum(s.n for s in subtasks)
    subset = ("all" if options.limit is None and options.sample is None
              else f"--limit {options.limit}" if options.limit is not None
              else f"--sample {options.sample} --seed {options.seed}")
    protocol = {
        "harness": f"lm-eval {LM_EVAL_VERSION}",
        "shots": out.get("n-shot", {}).get(name, options.shots if options.shots is not None else 0),
        "subset": subset,
        "source": "local data (rankwise conversion)" if local else "lm-eval's own dataset",
        "prompt": f"lm-eval {LM_EVAL_VERSION} {name} (its own task configuration)",
        "metrics": {m: "as defined by lm-eval" for m in metrics},
    }
    samples = []
    for s in out.get("samples", {}).get(name, []):
        resps = s.get("resps") or []
        rec: dict[str, Any] = {"doc_id": s.get("doc_id"), "target": s.get("target")}
        if resps and isinstance(resps[0], list | tuple) and resps[0] and isinstance(resps[0][0], list | tuple):
            rec["loglikelihoods"] = [float(r[0][0]) for r in resps]
            rec["is_greedy"] = [bool(r[0][1]) for r in resps]
        else:
            rec["responses"] = resps
        for m in metrics:
            if m in s:
                rec[m] = s[m]
        samples.append(rec)
    return TaskResult(task=name, metrics=metrics, stderr=stderr, n=n, protocol=protocol, samples=samples,
                      subtasks=subtasks)

"""Run a list of registered tasks on one model, and write their results (JSON) and samples (JSONL).

The runner resolves every task name and checks every data file and the model kind *before* running
anything, so a typo in the third task name or a missing file does not surface after an hour of the first
two. It knows nothing about task kinds beyond ``task.requires``: each task's ``run`` does its own work.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rankwise.errors import DataError, RankwiseError
from rankwise.evaluation.registry import EvalOptions, Task, get_task
from rankwise.evaluation.results import TaskResult
from rankwise.fileio import json_safe, write_json_atomic, write_text_atomic
from rankwise.settings import data_dir as default_data_dir

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def parse_task_list(spec: str | Sequence[str]) -> list[str]:
    """``"arc_easy, hellaswag"`` or a list -> unique names in order; empty -> one-line error."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        name = item.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise RankwiseError("no tasks given: pass --tasks with a comma-separated list of task names")
    return names


def resolve_tasks(names: Iterable[str]) -> list[Task]:
    """Task objects for the names (unknown name -> one-line error listing the known ones)."""
    return [get_task(n) for n in names]


def model_kind(model: Any) -> str:
    """``"causal-lm"`` for a model with a causal LM head, else ``"encoder"``.

    Decided by the model class (``...ForCausalLM``/``...LMHeadModel``) or the config's declared
    architectures, so an in-memory decomposed model (same class, swapped Linear layers) keeps its kind.
    """
    names = [type(model).__name__, *(getattr(getattr(model, "config", None), "architectures", None) or [])]
    return "causal-lm" if any(str(n).endswith(_CAUSAL_SUFFIXES) for n in names) else "encoder"


def check_requirements(tasks: Sequence[Task], kind: str, model_name: str = "the model") -> None:
    """A one-line error when a task needs a model kind the given model is not (e.g. no LM head)."""
    for task in tasks:
        need = getattr(task, "requires", "causal-lm")
        if need in (None, "any") or need == kind:
            continue
        if need == "causal-lm":
            raise RankwiseError(
                f"task {task.name} ({task.kind}) needs a causal language model with an LM head; "
                f"{model_name} is an {kind} model without one"
            )
        raise RankwiseError(f"task {task.name} needs a {need} model; {model_name} is a {kind} model")


def check_data(tasks: Sequence[Task], options: EvalOptions) -> None:
    """Every file the tasks declare (``required_files()``) exists: else a one-line error naming it."""
    needed = [(t, rel) for t in tasks for rel in _required_files(t)]
    if not needed:
        return
    root = options.data_dir or default_data_dir()
    if root is not None and not Path(root).is_dir():
        raise DataError(
            f"data directory {root} does not exist (pass --data-dir or set RANKWISE_DATA to the benchmark "
            f"folder; see its README.md for the expected files)"
        )
    for task, rel in needed:
        task.data_path(options, rel)


def _required_files(task: Task) -> list[str]:
    fn = getattr(task, "required_files", None)
    return list(fn()) if callable(fn) else []


def evaluate(
    model: Any,
    tokenizer: Any,
    task_names: str | Sequence[str],
    options: EvalOptions | None = None,
    *,
    kind: str | None = None,
    model_name: str = "the model",
    on_result: Callable[[TaskResult], None] | None = None,
) -> list[TaskResult]:
    """Run the named tasks on ``model`` and return their results in order.

    ``kind`` overrides the detected model kind (``"causal-lm"``/``"encoder"``); ``on_result`` is called
    after each task (the CLI prints as it goes).
    """
    options = options or EvalOptions()
    tasks = resolve_tasks(parse_task_list(task_names))
    check_requirements(tasks, kind or model_kind(model), model_name)
    check_data(tasks, options)
    results: list[TaskResult] = []
    for task in tasks:
        result = task.run(model, tokenizer, options)  # Task.run times the task
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# --------------------------------------------------------------------------------------------- output


def iter_samples(result: TaskResult) -> Iterator[dict[str, Any]]:
    """Every per-item record of a result (a group's come from its subtasks), tagged with its task."""
    for rec in result.samples:
        yield {"task": result.task, **rec}
    for sub in result.subtasks:
        yield from iter_samples(sub)


def results_document(results: Sequence[TaskResult], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON written by ``--json``: run metadata plus, per task, metrics, stderrs, n and protocol."""
    return json_safe({**meta, "results": {r.task: r.to_dict() for r in results}})


def save_results(path: Path, results: Sequence[TaskResult], meta: dict[str, Any]) -> None:
    write_json_atomic(path, results_document(results, meta))


def save_samples(path: Path, results: Sequence[TaskResult]) -> int:
    """Per-item records of every task as JSONL; returns the number of lines written."""
    lines = [json.dumps(json_safe(rec)) for r in results for rec in iter_samples(r)]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)

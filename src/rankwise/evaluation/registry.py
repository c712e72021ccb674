"""The task registry: tasks register themselves by name, the CLI and studies look them up.

A task is a class with ``name``, ``kind`` and ``run(...)``; adding a benchmark is one new module under
:mod:`rankwise.evaluation.tasks` that decorates its class with :func:`register_task`. A task that lm-eval
can also run on the same local files says how next to its own data reading (:meth:`Task.lm_eval_binding`:
lm-eval's task YAML, the split, the conversion of the file into the Hugging Face dataset's records);
:mod:`rankwise.evaluation.harness` only loops over the registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from rankwise.errors import DataError, RankwiseError
from rankwise.evaluation.results import TaskResult
from rankwise.evaluation.sampling import Subset, select
from rankwise.settings import data_dir as default_data_dir

TaskKind = Literal["loglikelihood", "perplexity", "generation", "embedding"]
T = TypeVar("T")


@dataclass
class EvalOptions:
    """Options shared by every task; each task uses what applies to it and records it in its protocol."""

    data_dir: Path | None = None
    limit: int | None = None  # the first N items, as lm-eval's --limit
    sample: int | None = None  # a seeded random subset of N items
    #: for a group task (MMLU and its categories): ``sample`` draws N items from all members' items pooled,
    #: not N per member as lm-eval's per-task --limit does (the only way below one item per subject)
    pooled: bool = False
    seed: int = 1234
    shots: int | None = None  # None = the task's default
    batch_size: int = 16
    seq_len: int | None = None
    log_samples: bool = False
    progress: bool = True
    #: log-likelihood scoring strategy: "auto" (the fastest exact one), "packed", "shared-context" or "full"
    strategy: str = "auto"
    #: What tasks derive from their data files and the tokenizer alone (parsed documents, token ids), kept
    #: by a caller that evaluates the same tasks many times with one tokenizer (a study worker with reuse
    #: on: every trial changes the model, never these). None: derived afresh on every evaluation, as a
    #: separate ``rankwise eval`` run does. Not part of the options' identity.
    derived: dict[tuple[Any, ...], Any] | None = field(default=None, compare=False, repr=False)

    def derive(self, key: tuple[Any, ...], make: Callable[[], T]) -> T:
        """``make()``, or the value made earlier for ``key`` when these options carry a ``derived`` cache.

        ``key`` names everything the value depends on besides the tokenizer (task, file, shots, seed)."""
        if self.derived is None:
            return make()
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]


Records = dict[str, list[dict[str, Any]]]  # split name -> records in the layout lm-eval's dataset has


@dataclass(frozen=True)
class LmEvalBinding:
    """How lm-eval 0.4.13 runs a rankwise task on the same local data."""

    yaml: str  # lm-eval's task file, relative to lm_eval/tasks (its prompts, choices and metrics are used)
    split: str  # the split lm-eval's task evaluates ("test" or "validation")
    records: Callable[[EvalOptions], Records]  # the local file(s) converted to that dataset's records


class Task:
    """Base of all tasks. ``requires`` says which model kind the task needs (``causal-lm`` or ``encoder``)."""

    name: ClassVar[str]
    kind: ClassVar[TaskKind]
    requires: ClassVar[str] = "causal-lm"
    description: ClassVar[str] = ""
    #: Data files (relative to the data directory) the task reads; checked before any model runs.
    files: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **declared: Any) -> None:
        """Class keywords set the class attributes, so a task is declared as data (as lm-eval declares its
        tasks): ``class BoolQ(SuperGlueTask, name="boolq", files=("boolq/val.jsonl",), ...)``."""
        super().__init_subclass__()
        unknown = [key for key in declared if not hasattr(cls, key) and key not in Task.__annotations__]
        if unknown:
            raise TypeError(f"{cls.__name__}: no task attribute {', '.join(unknown)}")
        for key, value in declared.items():
            setattr(cls, key, value)

    def required_files(self) -> tuple[str, ...]:
        return self.files

    def run(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:
        """:meth:`evaluate`, timed: ``seconds`` is the whole call unless the task timed its own part."""
        start = time.perf_counter()
        result = self.evaluate(model, tokenizer, options)
        if result.seconds is None:
            result.seconds = time.perf_counter() - start
        return result

    def evaluate(self, model: Any, tokenizer: Any, options: EvalOptions) -> TaskResult:  # pragma: no cover
        """The task's metrics on ``model`` (subclasses implement this; callers use :meth:`run`)."""
        raise NotImplementedError

    @staticmethod
    def subset(total: int, options: EvalOptions) -> Subset:
        """Which of ``total`` items to evaluate under ``--limit``/``--sample``/``--seed``."""
        return select(total, options.limit, options.sample, options.seed)

    def lm_eval_binding(self) -> LmEvalBinding | None:
        """lm-eval's version of this task on the local data; None where lm-eval has no such task here."""
        return None

    def lm_eval_members(self) -> tuple[str, ...]:
        """For a group task (MMLU and its categories): the member tasks lm-eval aggregates by size."""
        return ()

    @staticmethod
    def data_path(options: EvalOptions, relative: str) -> Path:
        """A file in the data directory, or a one-line error naming the expected path and the README."""
        root = options.data_dir or default_data_dir()
        if root is None:
            raise DataError(
                f"no data directory: set RANKWISE_DATA or pass --data-dir (expected {relative} inside it; "
                "see the data README)"
            )
        path = Path(root) / relative
        if not path.exists():
            raise DataError(f"missing data file {path} (see {Path(root) / 'README.md'} for the expected files)")
        return path


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name``."""
    _TASKS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import rankwise.evaluation.tasks  # noqa: F401  (imports every task module, which registers them)


def get_task(name: str) -> Task:
    _ensure_loaded()
    try:
        return _TASKS[name]()
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_TASKS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RankwiseError(f"unknown task '{name}' ({hint}known: {', '.join(_summary_names())})") from None


def _summary_names() -> list[str]:
    """Task names for messages, with the 57 single MMLU subjects collapsed into one entry."""
    groups = {"mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"}
    subjects = {n for n in _TASKS if n.startswith("mmlu_") and n not in groups}
    return [*(n for n in sorted(_TASKS) if n not in subjects), f"mmlu_<subject> ({len(subjects)} subjects)"]


def task_names() -> list[str]:
    _ensure_loaded()
    return sorted(_TASKS)


TaskFactory = Callable[[], Task]

"""``rankwise eval``: benchmark a model (bundled alias, folder, decomposed checkpoint) on registered tasks.

Prints a results table (value ± standard error, n, protocol), optionally writes the results as JSON and
the per-item log-likelihoods and predictions as JSONL. ``--harness lm-eval`` runs the same task names
through lm-eval instead (local data for the tasks rankwise defines, lm-eval's own datasets otherwise).
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rankwise.cli.main import app
from rankwise.errors import OutputError, RankwiseError
from rankwise.evaluation.registry import EvalOptions
from rankwise.evaluation.results import TaskResult
from rankwise.evaluation.sampling import validate as validate_subset
from rankwise.models import DEFAULT_MODEL

HARNESSES = ("rankwise", "lm-eval")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Bundled alias, local folder (also a decomposed checkpoint), "
                                              ".gguf file or HF model id.")] = DEFAULT_MODEL,
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="Comma-separated task names, e.g. "
                                                             "arc_easy,hellaswag,mmlu.")] = "",
    limit: Annotated[int | None, typer.Option(help="Only the first N items of each task (as lm-eval --limit; "
                                                   "per subject for MMLU).")] = None,
    sample: Annotated[int | None, typer.Option(help="A seeded random subset of N items per task.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --sample.")] = 1234,
    shots: Annotated[int | None, typer.Option(help="Few-shot examples (MMLU: 0-5 from dev); "
                                                   "default: the task's own.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Contexts per forward pass.")] = 16,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per window or context: wikitext_token "
                                                                  "windows (default 2048), the context limit of "
                                                                  "the other tasks (default: the model's).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Benchmark data folder "
                                                                     "(default: $RANKWISE_DATA).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: a rankwise "
                                                   "checkpoint's saved dtype, float32 otherwise).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda (cuda:N), mps or auto (cuda when available).")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results (metrics, stderr, n, "
                                                                 "protocol) to this JSON file.")] = None,
    log_samples: Annotated[Path | None, typer.Option("--log-samples", help="Write per-item log-likelihoods "
                                                                           "and predictions to this JSONL file.")] = None,
    harness: Annotated[str, typer.Option(help="rankwise (default) or lm-eval (needs the 'harness' extra).")]
    = "rankwise",
    strategy: Annotated[str, typer.Option(help="Log-likelihood scoring: auto (the fastest exact one), packed, "
                                               "shared-context or full; refused where it would be inexact.")]
    = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Evaluate a model on benchmarks: accuracy (acc, acc_norm) or perplexity, with standard errors."""
    from rankwise.cli.common import check_output_file, on_interrupt, write_note
    from rankwise.evaluation import runner
    from rankwise.fileio import write_or_rescue
    from rankwise.settings import check_data_dir

    if harness not in HARNESSES:
        raise RankwiseError(f"unknown harness '{harness}': choose one of {', '.join(HARNESSES)}")
    from rankwise.evaluation.engine import STRATEGIES

    if strategy not in STRATEGIES:
        raise RankwiseError(f"unknown --strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    if strategy != "auto" and harness != "rankwise":
        raise RankwiseError("--strategy applies to --harness rankwise; lm-eval scores one sequence per request")
    if batch_size < 1:
        raise RankwiseError(f"--batch-size must be at least 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise RankwiseError(f"--seq-len must be at least 1, got {seq_len}")
    names = runner.parse_task_list(tasks)
    options = EvalOptions(data_dir=data_dir, limit=limit, sample=sample, seed=seed, shots=shots,
                          batch_size=batch_size, seq_len=seq_len, log_samples=log_samples is not None,
                          progress=not quiet, strategy=strategy)
    validate_subset(limit, sample)
    check_data_dir(data_dir)
    if harness == "rankwise":
        resolved = runner.resolve_tasks(names)
        runner.check_data(resolved, options)
    else:
        from rankwise.evaluation.harness import import_lm_eval

        import_lm_eval()  # a one-line error before the model loads if the extra is missing
    check_output_file(json_out, "--json")  # before the work: a bad path fails now, not after an hour
    check_output_file(log_samples, "--log-samples")
    on_interrupt(write_note({"--json": json_out, "--log-samples": log_samples}) +
                 " (the results of finished tasks are printed above)")

    from rankwise.models import load

    console = Console(stderr=True)
    start = time.perf_counter()
    from rankwise.devices import resolve_device

    device = resolve_device(device)
    loaded = load(model, dtype=dtype, device=device)
    if harness == "rankwise":
        runner.check_requirements(resolved, loaded.info.kind, loaded.info.name)
        results = runner.evaluate(loaded.model, loaded.tokenizer, names, options, kind=loaded.info.kind,
                                  model_name=loaded.info.name,
                                  on_result=lambda r: console.print(_done_line(r)))
    else:
        from rankwise.evaluation.harness import evaluate_with_lm_eval

        if loaded.info.kind != "causal-lm":
            raise RankwiseError(f"--harness lm-eval evaluates causal language models; {loaded.info.name} is an "
                                f"{loaded.info.kind} model without an LM head")
        results = evaluate_with_lm_eval(loaded.model, loaded.tokenizer, names, options)
    elapsed = time.perf_counter() - start

    Console().print(results_table(results, title=f"{loaded.info.name} ({loaded.info.dtype}, "
                                                 f"harness {harness}): {elapsed:.1f} s"))
    meta = {
        "model": loaded.info.to_dict(),
        "harness": harness,
        "options": {"tasks": names, "limit": limit, "sample": sample, "seed": seed, "shots": shots,
                    "batch_size": batch_size, "strategy": strategy, "seq_len": seq_len, "dtype": loaded.info.dtype, "device": device,
                    "data_dir": str(data_dir) if data_dir else None},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": elapsed,
    }
    failed: list[str] = []  # each output is written (or rescued) even if the other fails
    if json_out is not None:
        try:
            write_or_rescue(json_out, lambda path: runner.save_results(path, results, meta), "the results")
            console.print(f"results written to {json_out}")
        except OutputError as exc:
            failed.append(str(exc))
    if log_samples is not None:
        try:
            n = write_or_rescue(log_samples, lambda path: runner.save_samples(path, results), "the per-item records")
            console.print(f"{n} per-item records written to {log_samples}")
        except OutputError as exc:
            failed.append(str(exc))
    if failed:
        raise OutputError("; ".join(failed))


def _done_line(r: TaskResult) -> str:
    shown = ", ".join(f"{k} {_fmt(k, v)}" for k, v in r.metrics.items())
    how = f", {r.protocol['strategy']}" if "strategy" in r.protocol else ""
    return f"[green]done[/green] {r.task}: {shown} (n={r.n}, {r.seconds or 0:.1f} s{how})"


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if "perplexity" in metric or metric in ("ppl", "word_perplexity") else f"{value:.4f}"


def _protocol_text(p: dict[str, Any]) -> str:
    bits = []
    if "shots" in p:
        bits.append(f"{p['shots']}-shot" if isinstance(p["shots"], int) else f"shots {p['shots']}")
    if "subset" in p:
        bits.append(str(p["subset"]))
    return "; ".join(bits)


def results_table(results: list[TaskResult], title: str = "") -> Table:
    """One row per (task, metric), then the task's direct subtasks (e.g. MMLU's categories) indented."""
    table = Table(title=title)
    for col, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"),
                         ("n", "right"), ("protocol", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def rows(r: TaskResult, indent: str) -> None:
        for i, (metric, value) in enumerate(r.metrics.items()):
            table.add_row(indent + r.task if i == 0 else "", metric, _fmt(metric, value),
                          _fmt(metric, r.stderr.get(metric)), str(r.n) if i == 0 else "",
                          _protocol_text(r.protocol) if i == 0 else "")

    for r in results:
        rows(r, "")
        for sub in r.subtasks:
            rows(sub, "  ")
    return table

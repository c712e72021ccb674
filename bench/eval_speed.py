"""Evaluation speed: lm-eval 0.4.13 vs rankwise on the same items, same model, same process.

For ARC-Easy (short contexts, 4-5 choices) and HellaSwag (long contexts, 4 long endings) both tools score
the first N items of the local files (lm-eval through its own task configurations pointed at the same data,
see rankwise.evaluation.harness). Prints wall times, the speed-up, acc and acc_norm of both, and how far
apart the per-item log-likelihoods are; writes everything as JSON.

    .venv/bin/python bench/eval_speed.py [--arc-items 200] [--hellaswag-items 100] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DISABLE_MULTIPROC", "1")
# On a shared machine, OpenMP threads that spin while waiting slow both tools down several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from rich.console import Console
from rich.table import Table

from rankwise.errors import RankwiseError
from rankwise.evaluation import harness
from rankwise.evaluation.registry import EvalOptions
from rankwise.evaluation.runner import evaluate
from rankwise.fileio import write_json_atomic
from rankwise.models import DEFAULT_MODEL, load


def _per_item(result) -> dict[int, dict]:
    return {s["doc_id"]: s for s in result.samples}


def compare(model, tokenizer, task: str, items: int, batch_size: int, data_dir: str | None) -> dict:
    """Time lm-eval and rankwise on the first ``items`` of ``task``; compare their per-item scores."""
    options = EvalOptions(data_dir=Path(data_dir) if data_dir else None, limit=items, batch_size=batch_size,
                          progress=False)
    with tempfile.TemporaryDirectory(prefix="rankwise-bench-") as tmp:
        harness.write_local_tasks([task], options, Path(tmp))
        start, cpu = time.perf_counter(), time.process_time()
        out = harness.run_lm_eval(model, tokenizer, [task], options, Path(tmp), include_defaults=False,
                                  bootstrap_iters=0)
        lm_eval_s, lm_eval_cpu = time.perf_counter() - start, time.process_time() - cpu
    theirs = harness.to_task_result(out, task, True, options)
    start, cpu = time.perf_counter(), time.process_time()
    (ours,) = evaluate(model, tokenizer, [task], options)
    rankwise_s, rankwise_cpu = time.perf_counter() - start, time.process_time() - cpu

    a, b = _per_item(ours), _per_item(theirs)
    max_diff = max(abs(x - y) for k in b for x, y in zip(a[k]["loglikelihoods"], b[k]["loglikelihoods"], strict=True))
    pred_mismatch = sum(
        a[k]["pred"] != max(range(len(b[k]["loglikelihoods"])), key=lambda i: (b[k]["loglikelihoods"][i], -i))
        for k in b
    )
    return {
        "task": task, "n": ours.n, "requests": sum(len(s["choices"]) for s in ours.samples),
        "lm_eval_seconds": lm_eval_s, "rankwise_seconds": rankwise_s, "speedup": lm_eval_s / rankwise_s,
        "lm_eval_cpu_seconds": lm_eval_cpu, "rankwise_cpu_seconds": rankwise_cpu,
        "cpu_speedup": lm_eval_cpu / rankwise_cpu,
        "lm_eval": {"metrics": theirs.metrics, "stderr": theirs.stderr},
        "rankwise": {"metrics": ours.metrics, "stderr": ours.stderr},
        "max_abs_loglikelihood_diff": max_diff, "prediction_mismatches": pred_mismatch,
        "protocol": ours.protocol,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--arc-items", type=int, default=200)
    parser.add_argument("--hellaswag-items", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval: sequences, rankwise: contexts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default="bench/results/eval_speed.json")
    args = parser.parse_args(argv)
    if args.data_dir is None and not os.environ.get("RANKWISE_DATA"):
        sibling = Path(__file__).resolve().parents[2] / "shared" / "data"  # the checkout's CI layout
        args.data_dir = str(sibling) if sibling.is_dir() else None
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=200)
    model, tokenizer, info = load(args.model)
    with torch.inference_mode():  # warm-up, so neither tool pays first-call costs
        model(torch.ones((1, 16), dtype=torch.long))

    rows = []
    for task, items in (("arc_easy", args.arc_items), ("hellaswag", args.hellaswag_items)):
        if items > 0:
            console.print(f"[bold]{task}[/bold]: {items} items, lm-eval then rankwise ...")
            rows.append(compare(model, tokenizer, task, items, args.batch_size, args.data_dir))

    table = Table(title=f"evaluation wall time, {info.name} float32, batch {args.batch_size}, "
                        f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    for col in ("task", "n (requests)", "lm-eval s", "rankwise s", "speed-up", "CPU s lm-eval / rankwise",
                "CPU speed-up", "lm-eval acc / acc_norm", "rankwise acc / acc_norm", "max |Δ ll|",
                "pred. mismatches"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        lm, rw = r["lm_eval"]["metrics"], r["rankwise"]["metrics"]
        table.add_row(r["task"], f"{r['n']} ({r['requests']})", f"{r['lm_eval_seconds']:.1f}",
                      f"{r['rankwise_seconds']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['lm_eval_cpu_seconds']:.1f} / {r['rankwise_cpu_seconds']:.1f}", f"{r['cpu_speedup']:.2f}x",
                      f"{lm['acc']:.4f} / {lm['acc_norm']:.4f}", f"{rw['acc']:.4f} / {rw['acc_norm']:.4f}",
                      f"{r['max_abs_loglikelihood_diff']:.1e}", str(r["prediction_mismatches"]))
    console.print(table)
    console.print("acc = argmax of summed log-likelihood; acc_norm = per-character normalised (lm-eval); "
                  "first N items of each local file (lm-eval --limit N); both tools in one process, same "
                  "threads. Wall seconds; CPU seconds (process time, all threads) are steadier on a busy host.")
    doc = {"model": info.to_dict(), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "load_average_at_end": os.getloadavg(), "results": rows}
    write_json_atomic(args.json, doc)
    console.print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

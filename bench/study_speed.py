"""Speed target for studies: the same sweeps with and without reuse, measured in one run on this machine.

Two 8-point sweeps on SmolLM2-135M (float32, 1 thread, one worker, fresh SQLite studies):

* ``single-layer``: each of 8 layers alone at rank 1, all 7 tensors (Tucker);
* ``layer-count``: rank 1 on all tensors of n = 1..8 evenly spaced layers.

Each runs twice as a study (the dense model is measured once per study in both modes):

* **reuse** (the default): the model is loaded once per worker and the dense modules are swapped back
  after every trial; factors of a (target, method, rank) are computed once and reused; calibration
  statistics (data-aware methods) are collected once per worker; task documents and token ids are
  derived from the data once per worker; the hidden states at each layer's input
  are recorded during the dense pass and replayed, so a trial changing only layers >= k skips blocks
  0..k-1 (bit-identical results);
* **no reuse** (``execution.reuse: false``): a fresh model load for every trial, every factor computed
  again, as running ``rankwise decompose`` + ``rankwise eval`` per point would.

Printed: wall time per sweep and mode, the ratio, and every point's metrics side by side (they must be
identical). Targets (issue 11): identical metrics; >= 2x faster with reuse on single-layer; no slower on
layer-count.

    .venv/bin/python bench/study_speed.py --limit 20 --json study_speed.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rankwise.fileio import write_json_atomic
from rankwise.studies import run_study

SWEEPS = {
    "single-layer": {"preset": "single-layer", "layers": [2, 6, 10, 14, 18, 22, 26, 29]},
    "layer-count": {"preset": "layer-count", "n": [1, 2, 3, 4, 5, 6, 7, 8]},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--limit", type=int, default=20, help="first N items of the task (same for every trial)")
    p.add_argument("--ppl-windows", type=int, default=1, help="WikiText-2 token-level windows (0: none)")
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--sweeps", default="single-layer,layer-count")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def spec_for(args: argparse.Namespace, sweep: str, reuse: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": f"{sweep}-{'reuse' if reuse else 'noreuse'}", "model": args.model,
                            "tasks": [{"name": args.task, "limit": args.limit}], "grid": [SWEEPS[sweep]],
                            "execution": {"reuse": reuse}}
    if args.ppl_windows:
        spec["perplexity"] = {"windows": args.ppl_windows, "seq_len": args.ppl_seq_len}
    return spec


def metric_values(trial: dict[str, Any]) -> dict[str, float]:
    return {name: m["value"] for name, m in (trial.get("metrics") or {}).items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    results: dict[str, Any] = {"protocol": {"model": args.model, "task": f"{args.task}, first {args.limit} items",
                                            "perplexity": f"{args.ppl_windows} windows x {args.ppl_seq_len} tokens",
                                            "threads": 1, "workers": 1}, "sweeps": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for sweep in [s.strip() for s in args.sweeps.split(",") if s.strip()]:
            runs = {}
            for reuse in (False, True):
                spec = spec_for(args, sweep, reuse)
                t0 = time.perf_counter()
                doc = run_study(spec, f"sqlite:///{tmp}/{spec['name']}.db", workers=1)
                wall = time.perf_counter() - t0
                trials = sorted((t for t in doc["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["point"])
                runs["reuse" if reuse else "no reuse"] = {"wall_s": wall, "trials": trials,
                                                          "dense_s": doc["dense"]["seconds"]}
                console.print(f"{sweep} {'with' if reuse else 'without'} reuse: {wall:.1f} s "
                              f"({len(trials)} trials + dense)")
            base, fast = runs["no reuse"], runs["reuse"]
            identical = [metric_values(a) == metric_values(b) for a, b in zip(base["trials"], fast["trials"],
                                                                              strict=True)]
            ratio = base["wall_s"] / fast["wall_s"]
            ok &= all(identical)
            table = Table(title=f"{sweep}: without reuse {base['wall_s']:.1f} s, with reuse {fast['wall_s']:.1f} s "
                                f"-> {ratio:.2f}x; metrics identical: {all(identical)}")
            for col in ("point", "params ratio", "metrics without reuse", "metrics with reuse", "identical",
                        "s without", "s with"):
                table.add_column(col)
            for a, b, same in zip(base["trials"], fast["trials"], identical, strict=True):
                fmt = lambda t: ", ".join(f"{k} {v:.4f}" for k, v in metric_values(t).items())  # noqa: E731
                table.add_row(a["label"], f"{a['params_ratio']:.3f}", fmt(a), fmt(b), "yes" if same else "NO",
                              f"{a['seconds']:.1f}", f"{b['seconds']:.1f}")
            console.print(table)
            results["sweeps"][sweep] = {
                "wall_s_without_reuse": base["wall_s"], "wall_s_with_reuse": fast["wall_s"], "speedup": ratio,
                "metrics_identical": all(identical),
                "points": [{"label": a["label"], "params_ratio": a["params_ratio"], "without": metric_values(a),
                            "with": metric_values(b), "seconds_without": a["seconds"], "seconds_with": b["seconds"]}
                           for a, b in zip(base["trials"], fast["trials"], strict=True)]}
    if args.json is not None:
        write_json_atomic(args.json, results)
        console.print(f"written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Speed target: rankwise's Tucker vs ``tensorly.decomposition.tucker`` on all 210 SmolLM2-135M targets.

Protocol (one run, one machine, same matrices for both tools):

* weights: the 210 decoder Linears of ``rankwise.models.load("smollm2-135m")`` (float32), from
  ``adapter_for(model).targets()``;
* settings: rank 1 (the paper's), a 50% parameter fraction (``fraction_rank(0.5, m, n, "three_factor")``, three-factor
  count r(m+n)+r²) and energy 0.9 (``energy_rank`` on rankwise's spectrum, computed once and timed separately
  since both tools need the rank before they start); ranks are [r, r] for both tools;
* rankwise: ``get_method("tucker").decompose(W, r)``; TensorLy: ``tucker(W, rank=[r, r])`` with its defaults
  (init='svd', n_iter_max=100, tol=1e-4), on the backend that a probe on 7 matrices finds fastest
  (numpy or pytorch; both timings printed);
* the two tools alternate matrix by matrix, so load on the shared machine hits both alike; wall and process
  CPU time are both reported (single-threaded by default: on 2 shared cores, two OpenMP threads mostly wait
  on each other — measured 10-50x slowdowns of LAPACK calls);
* error: relative Frobenius reconstruction error ‖W − A·G·Bᵀ‖/‖W‖ in float64, mean over the 210 matrices
  and the largest per-matrix difference between the tools.

Memory: a child process loads the model, resets the kernel's peak-RSS counter (VmHWM), applies the 50% Tucker
plan to the whole model with ``rankwise.decompose`` and reads the peak; compared with the dense model's
parameter bytes.

Targets: >= 5x faster than TensorLy at equal error (max |Δ error| <= 1e-4) in every setting; rank 1 for the
whole model in < 5 s; peak RSS while decomposing < 2x the dense model's bytes.

    .venv/bin/python bench/decompose_speed.py                        # ~5-10 min on 2 shared cores
    .venv/bin/python bench/decompose_speed.py --tensorly-every 5     # TensorLy on every 5th matrix (labelled)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rankwise.fileio import write_text_atomic

MODEL = "smollm2-135m"
SETTINGS = ("rank 1", "50% params", "energy 0.9")
SPEED_TARGET = 5.0
ERROR_TOL = 1e-4
RANK1_TARGET_S = 5.0
MEMORY_TARGET = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both tools (default 1)")
    p.add_argument("--tensorly-every", type=int, default=1,
                   help="run TensorLy on every N-th matrix only (default 1: all; totals then extrapolated, labelled)")
    p.add_argument("--backend", choices=("auto", "numpy", "pytorch"), default="auto",
                   help="TensorLy backend (default: the faster one on a 7-matrix probe)")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-RSS measurement")
    p.add_argument("--out", type=Path, default=Path("bench/results/decompose_speed.json"),
                   help="JSON results file ('-' for stdout)")
    p.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- helpers ------------------------------------------------------------------------------------------------
def limit_threads(threads: int) -> str:
    """Limit torch (MKL/OpenMP) and numpy (OpenBLAS) to ``threads``; returns a note on what was limited."""
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return f"torch threads={threads}; numpy BLAS threads not limited (threadpoolctl missing)"
    threadpool_limits(threads)
    return f"torch threads={threads}; numpy BLAS threads={threads} (threadpoolctl)"


def relative_error(W: torch.Tensor, approx: torch.Tensor) -> float:
    from rankwise.decomposition import relative_error as rel

    return rel(W, approx)


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


# --- the two tools ---------------------------------------------------------------------------------------
def rankwise_tucker(W: torch.Tensor, r: int) -> tuple[float, float, float, str]:
    """(wall s, cpu s, relative error, solver) for one rankwise Tucker decomposition."""
    from rankwise.decomposition import get_method

    method = get_method("tucker")
    w0, c0 = time.perf_counter(), time.process_time()
    result = method.decompose(W, r)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return wall, cpu, relative_error(W, result.factors.reconstruct()), result.solver


def tensorly_tucker(W: torch.Tensor, r: int, backend: str) -> tuple[float, float, float]:
    """(wall s, cpu s, relative error) for one ``tensorly.decomposition.tucker(W, rank=[r, r])``."""
    import tensorly as tl
    from tensorly.decomposition import tucker

    with tl.backend_context(backend):
        x = W.numpy() if backend == "numpy" else W
        w0, c0 = time.perf_counter(), time.process_time()
        core, (A, B) = tucker(x, rank=[r, r])
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    approx = torch.as_tensor(A, dtype=torch.float64) @ torch.as_tensor(core, dtype=torch.float64) \
        @ torch.as_tensor(B, dtype=torch.float64).T
    return wall, cpu, relative_error(W, approx)


# --- measurement ------------------------------------------------------------------------------------------
def load_targets() -> tuple[list[dict[str, Any]], int]:
    """Each target's name/shape/weight (float32 copies) and the dense model's parameter bytes."""
    from rankwise.models import adapter_for, load

    lm = load(MODEL)
    adapter = adapter_for(lm.model)
    targets = [{"name": t.name, "shape": (t.out_features, t.in_features),
                "W": adapter.linear(t.layer, t.role).weight.detach().float().clone()} for t in adapter.targets()]
    dense_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    del lm, adapter
    return targets, dense_bytes


def resolve_ranks(targets: list[dict[str, Any]]) -> tuple[dict[str, list[int]], float]:
    """Ranks per setting, and the seconds spent on the spectra that 'energy 0.9' needs."""
    from rankwise.decomposition import get_method
    from rankwise.design.ranks import energy_rank, fraction_rank

    t0 = time.perf_counter()
    spectra = [get_method("tucker").singular_values(t["W"]).tolist() for t in targets]
    spectrum_s = time.perf_counter() - t0
    ranks = {
        "rank 1": [1] * len(targets),
        "50% params": [fraction_rank(0.5, *t["shape"], "three_factor") for t in targets],
        "energy 0.9": [energy_rank(s, 0.9) for s in spectra],
    }
    return ranks, spectrum_s


def probe_backend(targets: list[dict[str, Any]], ranks: list[int]) -> dict[str, float]:
    """TensorLy seconds per backend on layer 0's seven matrices (at the 50% ranks)."""
    out = {}
    for backend in ("numpy", "pytorch"):
        tensorly_tucker(targets[0]["W"], ranks[0], backend)  # warm-up
        out[backend] = sum(tensorly_tucker(t["W"], r, backend)[0] for t, r in zip(targets[:7], ranks[:7], strict=True))
    return out


def run_setting(targets: list[dict[str, Any]], ranks: list[int], backend: str, every: int,
                progress: Progress, label: str) -> dict[str, Any]:
    rows = []
    task = progress.add_task(label, total=len(targets))
    for i, (t, r) in enumerate(zip(targets, ranks, strict=True)):
        rw, rc, re, solver = rankwise_tucker(t["W"], r)
        row: dict[str, Any] = {"name": t["name"], "shape": list(t["shape"]), "rank": r, "rankwise_s": rw,
                               "rankwise_cpu_s": rc, "rankwise_error": re, "solver": solver}
        if i % every == 0:
            tw, tc, te = tensorly_tucker(t["W"], r, backend)
            row.update(tensorly_s=tw, tensorly_cpu_s=tc, tensorly_error=te)
        rows.append(row)
        progress.advance(task)
    progress.remove_task(task)
    sampled = [row for row in rows if "tensorly_s" in row]
    scale = len(rows) / len(sampled)  # 1.0 unless --tensorly-every > 1
    summary = {
        "n_matrices": len(rows),
        "tensorly_matrices": len(sampled),
        "tensorly_extrapolated": scale != 1.0,
        "ranks": {"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks)},
        "rankwise_s": sum(row["rankwise_s"] for row in rows),
        "rankwise_cpu_s": sum(row["rankwise_cpu_s"] for row in rows),
        "tensorly_s": scale * sum(row["tensorly_s"] for row in sampled),
        "tensorly_cpu_s": scale * sum(row["tensorly_cpu_s"] for row in sampled),
        "rankwise_on_sampled_s": sum(row["rankwise_s"] for row in sampled),
        "rankwise_mean_error": statistics.fmean(row["rankwise_error"] for row in rows),
        "tensorly_mean_error": statistics.fmean(row["tensorly_error"] for row in sampled),
        "rankwise_mean_error_on_sampled": statistics.fmean(row["rankwise_error"] for row in sampled),
        "max_abs_error_diff": max(abs(row["rankwise_error"] - row["tensorly_error"]) for row in sampled),
        "solvers": dict(Counter(row["solver"] for row in rows)),
    }
    tensorly_sampled = sum(row["tensorly_s"] for row in sampled)
    summary["speedup_wall"] = tensorly_sampled / summary["rankwise_on_sampled_s"]
    summary["speedup_cpu"] = (sum(row["tensorly_cpu_s"] for row in sampled)
                              / sum(row["rankwise_cpu_s"] for row in sampled))
    return {"summary": summary, "matrices": rows}


# --- memory (child process) ------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakSampler:
    """Fallback when VmHWM cannot be reset: sample RSS every 2 ms in a thread."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def memory_child(out: Path, threads: int) -> None:
    """Load the model, reset the peak-RSS counter, apply the 50% Tucker plan, record the peak."""
    import rankwise
    from rankwise.design import Plan
    from rankwise.models import load

    limit_threads(threads)
    rss_runtime = _status_kb("VmRSS")  # Python + torch + rankwise, before the model exists
    lm = load(MODEL)
    model = lm.model
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_loaded = _status_kb("VmRSS")
    plan = Plan.simple(layers="all", tensors="all", rank=0.5, method="tucker")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux)
        how = "VmHWM reset via /proc/self/clear_refs"
        t0 = time.perf_counter()
        report = rankwise.decompose(model, plan, progress=False)
        seconds = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
    except OSError:
        how = "RSS sampled every 2 ms (psutil)"
        with PeakSampler() as sampler:
            t0 = time.perf_counter()
            report = rankwise.decompose(model, plan, progress=False)
            seconds = time.perf_counter() - t0
        peak = sampler.peak // 1024
    doc = {"dense_param_bytes": dense_bytes, "rss_runtime_bytes": rss_runtime * 1024,
           "rss_loaded_bytes": rss_loaded * 1024, "peak_rss_bytes": peak * 1024,
           "rss_after_bytes": _status_kb("VmRSS") * 1024, "rss_anon_after_bytes": _status_kb("RssAnon") * 1024,
           "rss_file_after_bytes": _status_kb("RssFile") * 1024, "how": how,
           "what": "rankwise.decompose(model, Plan.simple(all layers, all tensors, rank=0.5, method='tucker'))",
           "decompose_seconds": seconds, "params_before": report.params_before, "params_after": report.params_after}
    write_text_atomic(out, json.dumps(doc))


def measure_memory(threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(out), "--threads", str(threads)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"memory child failed (exit {proc.returncode}): {tail[0]}"}
        return json.loads(out.read_text())


# --- report -----------------------------------------------------------------------------------------------
def render(console: Console, doc: dict[str, Any]) -> None:
    backend = doc["tensorly_backend"]
    table = Table(title=f"Decompose all {doc['n_targets']} {MODEL} targets (float32, {doc['threads_note']}): "
                        f"rankwise tucker vs tensorly.decomposition.tucker [{backend} backend]")
    for col in ("setting", "ranks min/med/max", "rankwise s (cpu)", "tensorly s (cpu)", "speedup wall (cpu)",
                "mean rel err rankwise", "mean rel err tensorly", "max |Δerr|", "target", "rankwise solvers"):
        table.add_column(col, justify="right" if col not in ("setting", "rankwise solvers", "target") else "left")
    for name, res in doc["settings"].items():
        s = res["summary"]
        ok = s["speedup_wall"] >= SPEED_TARGET and s["max_abs_error_diff"] <= ERROR_TOL
        extra = f" (extrapolated from {s['tensorly_matrices']})" if s["tensorly_extrapolated"] else ""
        r = s["ranks"]
        table.add_row(name, f"{r['min']}/{r['median']:g}/{r['max']}",
                      f"{s['rankwise_s']:.2f} ({s['rankwise_cpu_s']:.2f})",
                      f"{s['tensorly_s']:.2f} ({s['tensorly_cpu_s']:.2f}){extra}",
                      f"{s['speedup_wall']:.1f}x ({s['speedup_cpu']:.1f}x)",
                      f"{s['rankwise_mean_error_on_sampled']:.6f}", f"{s['tensorly_mean_error']:.6f}",
                      f"{s['max_abs_error_diff']:.1e}",
                      f"{'PASS' if ok else 'FAIL'} >= {SPEED_TARGET:g}x, |Δ| <= {ERROR_TOL:g}",
                      ", ".join(f"{k} {v}" for k, v in s["solvers"].items()))
    console.print(table)
    probe = doc["backend_probe_s"]
    if probe:
        console.print("TensorLy backend probe (layer 0's 7 matrices at the 50% ranks, wall s): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in probe.items()) + f" -> {backend}")
    console.print(f"Spectra for 'energy 0.9' (rankwise singular_values, all {doc['n_targets']} matrices, needed by "
                  f"both tools, not in the totals): {doc['spectrum_s']:.2f} s")
    r1 = doc["settings"]["rank 1"]["summary"]["rankwise_s"]
    console.print(f"Rank 1, whole model: {r1:.2f} s wall -> "
                  f"{'PASS' if r1 < RANK1_TARGET_S else 'FAIL'} (target < {RANK1_TARGET_S:g} s)")
    mem = doc.get("memory")
    if mem is None:
        return
    if "error" in mem:
        console.print(f"[red]memory: {mem['error']}[/red]")
        return
    gib = 1024**3
    dense = mem["dense_param_bytes"]
    model_peak = mem["peak_rss_bytes"] - mem["rss_runtime_bytes"]
    ratio = model_peak / dense
    mt = Table(title="Peak memory while decomposing the whole model (50% Tucker plan, rankwise.decompose, "
                     "child process)")
    for col in ("dense params", "runtime RSS", "RSS after load", "peak RSS", "peak − runtime",
                "(peak − runtime) / dense", "peak / dense", "target"):
        mt.add_column(col, justify="right")
    mt.add_row(f"{dense / gib:.3f} GiB", f"{mem['rss_runtime_bytes'] / gib:.3f} GiB",
               f"{mem['rss_loaded_bytes'] / gib:.3f} GiB", f"{mem['peak_rss_bytes'] / gib:.3f} GiB",
               f"{model_peak / gib:.3f} GiB", f"{ratio:.2f}x", f"{mem['peak_rss_bytes'] / dense:.2f}x",
               f"{'PASS' if ratio < MEMORY_TARGET else 'FAIL'} < {MEMORY_TARGET:g}x")
    console.print(mt)
    console.print(
        f"peak: {mem['how']}. 'runtime' = RSS of Python + torch + rankwise before the model is loaded; the target "
        f"is judged on the memory the model and its decomposition add (peak − runtime). The weights are "
        f"memory-mapped safetensors: after the run RSS is {mem['rss_anon_after_bytes'] / gib:.3f} GiB anonymous "
        f"+ {mem['rss_file_after_bytes'] / gib:.3f} GiB file-backed (reclaimable page cache of the dense file). "
        f"decompose took {mem['decompose_seconds']:.1f} s; params {mem['params_before']:,} -> {mem['params_after']:,}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.threads)
        return 0
    warnings.filterwarnings("ignore", category=UserWarning, module="tensorly")
    console = Console(width=220)
    note = limit_threads(args.threads)
    t_start = time.perf_counter()
    targets, dense_bytes = load_targets()
    ranks, spectrum_s = resolve_ranks(targets)
    # warm-up both tools (first-call library initialisation is not what we measure)
    rankwise_tucker(targets[0]["W"], 4)
    probe: dict[str, float] = {}
    if args.backend == "auto":
        probe = probe_backend(targets, ranks["50% params"])
        backend = min(probe, key=probe.__getitem__)
    else:
        backend = args.backend
        tensorly_tucker(targets[0]["W"], 4, backend)
    settings = {}
    with progress_bar(console) as progress:
        for name in SETTINGS:
            settings[name] = run_setting(targets, ranks[name], backend, args.tensorly_every, progress, name)
    doc: dict[str, Any] = {
        "model": MODEL, "n_targets": len(targets), "dtype": "float32", "threads_note": note,
        "torch": torch.__version__, "tensorly_backend": backend, "backend_probe_s": probe,
        "spectrum_s": spectrum_s, "dense_param_bytes": dense_bytes, "settings": settings,
        "protocol": __doc__.split("\n\n")[1],
    }
    if not args.skip_memory:
        doc["memory"] = measure_memory(args.threads)
    doc["total_seconds"] = time.perf_counter() - t_start
    render(console, doc)
    text = json.dumps(doc, indent=2) + "\n"
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        write_text_atomic(args.out, text)
        console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

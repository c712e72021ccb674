"""``rankwise bench``: size, FLOPs, latency, memory and energy of a decomposed model next to its dense baseline.

Defaults are sized for a small CPU: prefill at 128 and 512 tokens (2048 takes about 8 s per run for
SmolLM2-135M on 2 cores: add it with ``--seq-lens 128,512,2048``), 16 decode steps after a 128-token
context at batch 1 and 8, one scoring batch of 8 x 256 tokens, 5 repeats after 1 warm-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rankwise.cli.main import app
from rankwise.errors import RankwiseError
from rankwise.fileio import write_json_atomic, write_or_rescue


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    """``"128,512"`` -> (128, 512); anything else is a one-line error naming the option."""
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise RankwiseError(f"{option}: '{text}' is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise RankwiseError(f"{option}: '{text}' must list positive integers")
    return values


def parse_scoring(text: str) -> tuple[int, int] | None:
    """``"8x256"`` -> (8, 256); ``"none"`` -> None."""
    if text.strip().lower() == "none":
        return None
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise RankwiseError(f"--scoring: '{text}' is not BATCHxTOKENS (e.g. 8x256) or none")
    batch, seq = parse_ints(parts[0], "--scoring"), parse_ints(parts[1], "--scoring")
    return batch[0], seq[0]


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="A rankwise checkpoint folder, or any model spec (with --plan or "
                                               "--baseline).")],
    baseline: Annotated[str | None, typer.Option(help="Dense baseline model spec; 'merged' = the checkpoint with "
                                                      "its factors multiplied out (same shapes as dense). Default: "
                                                      "the source model recorded in the checkpoint.")] = None,
    plan: Annotated[Path | None, typer.Option(help="Decompose MODEL with this plan in memory and bench it against "
                                                   "MODEL itself.")] = None,
    seq_lens: Annotated[str, typer.Option(help="Prefill lengths (tokens, batch 1).")] = "128,512",
    batch_sizes: Annotated[str, typer.Option(help="Decode batch sizes.")] = "1,8",
    decode_tokens: Annotated[int, typer.Option(help="Timed decode steps per run.")] = 16,
    context: Annotated[int, typer.Option(help="Tokens in the KV cache before the timed decode steps.")] = 128,
    scoring: Annotated[str, typer.Option(help="Scoring-mode batch BATCHxTOKENS (log-likelihood forward), or "
                                              "none.")] = "8x256",
    repeats: Annotated[int, typer.Option(help="Timed repeats per workload (median reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per workload.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda (cuda:N) or auto (cuda when available).")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch.set_num_threads (default: torch's).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's "
                                                   "own, float32 otherwise).")] = None,
    execution: Annotated[str, typer.Option(help="auto: choose fold/merge and factor memory layout per layer by "
                                                "measurement (cached); as-is: run the factors as stored.")] = "auto",
    guard: Annotated[bool, typer.Option("--guard/--no-guard", help="With --execution auto: merge more layers "
                                                                   "until decode is not slower than dense.")] = True,
    control: Annotated[bool, typer.Option("--control", help="Also time the baseline a second time (A/A) to show "
                                                            "the noise.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write all results to this JSON file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Dense vs decomposed: parameters, bytes, FLOPs, prefill/decode/scoring speed, memory, energy, ideal vs measured."""
    import torch

    from rankwise.cli.common import check_output_file, on_interrupt, write_note
    from rankwise.devices import resolve_device
    from rankwise.efficiency.compare import BenchConfig, compare
    from rankwise.efficiency.execution import choose_execution
    from rankwise.efficiency.pairing import bench_pair, check_pairing

    # --- check the options before anything slow ------------------------------------------------------------
    device = resolve_device(device)
    config = BenchConfig(seq_lens=parse_ints(seq_lens, "--seq-lens"),
                         batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
                         decode_tokens=parse_ints(str(decode_tokens), "--decode-tokens")[0],
                         context=parse_ints(str(context), "--context")[0], scoring=parse_scoring(scoring),
                         repeats=parse_ints(str(repeats), "--repeats")[0], warmup=max(0, warmup), device=device,
                         control=control)
    if execution not in ("auto", "as-is"):
        raise RankwiseError(f"--execution: '{execution}' is not auto or as-is")
    if threads is not None:
        if threads < 1:
            raise RankwiseError(f"--threads: {threads} is not a positive number of threads")
        torch.set_num_threads(threads)
    check_output_file(json_out, "--json")  # before the work: a bad path fails now, not after the timings
    on_interrupt(write_note({"--json": json_out}))
    the_plan = None
    if plan is not None:
        from rankwise.decomposition.apply import as_plan

        check_pairing(model, plan, baseline)
        the_plan = as_plan(plan)

    # --- models ----------------------------------------------------------------------------------------------
    console = Console(stderr=True)
    pair = bench_pair(model, plan=the_plan, plan_name=plan.stem if plan else "plan", baseline=baseline,
                      dtype=dtype, device=device, progress=not quiet)
    dense, decomposed, base_name, dec_name, extra = (pair.dense, pair.decomposed, pair.base_name, pair.dec_name,
                                                     pair.extra)
    if execution == "auto":
        from rankwise.models.forward import is_causal_lm

        er = choose_execution(decomposed, device=device, guard=guard and is_causal_lm(decomposed), reference=dense)
        extra["execution"] = er.to_dict()
        if not quiet:
            Console().print(f"execution forms: {er.counts()}, factor layouts: {er.layout_counts()} "
                            f"(micro-benchmarks cached in {er.cache_file})")

    # --- measure ---------------------------------------------------------------------------------------------
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("bench", total=None)
        result = compare({base_name: dense, dec_name: decomposed}, base_name, config,
                         progress=lambda done, total, label: bar.update(task, completed=done, total=total,
                                                                         description=label))
    result.extra.update(extra)
    out = Console()
    out.print(result.size_table())
    out.print(result.speed_table())
    if "disk_bytes" in extra:
        out.print(f"checkpoint on disk: {extra['disk_bytes']['total'] / 2**20:,.1f} MiB "
                  f"({extra['disk_bytes']['weights'] / 2**20:,.1f} MiB safetensors)")
    if result.decode_reason:
        out.print(f"decode: not measured ({result.decode_reason})")
    if result.energy_reason:
        out.print(f"energy: not measurable on this machine ({result.energy_reason})")
    if json_out is not None:
        write_or_rescue(json_out, lambda p: write_json_atomic(p, result.to_dict()), "the results")
        out.print(f"results: {json_out}")

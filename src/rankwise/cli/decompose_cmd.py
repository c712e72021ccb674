"""``rankwise decompose``: apply a plan to a model and save the result as a loadable checkpoint.

Everything a user can get wrong (an existing OUT, a malformed plan, a layer the model lacks, a rank of 0
or above min(m, n), an unknown method or method setting, NaN/Inf weights, missing calibration data) is
checked before OUT is written, and OUT is written to a temp folder and renamed: a failed run leaves no OUT,
or the old one. Method names and settings are checked before the model is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rankwise.cli.main import app
from rankwise.efficiency.compare import format_bytes
from rankwise.errors import PlanError, RankwiseError
from rankwise.fileio import write_json_atomic, write_or_rescue
from rankwise.models import DEFAULT_MODEL


def build_plan(plan_file: Path | None, layers: str | None, tensors: str, rank: str, method: str | None,
               force: bool, method_args: list[str] | None = None) -> Any:
    """The plan from ``--plan`` or from the one-rule flags (not both); ``--force`` applies to either.

    Every method the plan names is checked here (name and settings), so a typo fails before the model
    loads; ``--method-arg KEY=VALUE`` values are parsed by the method config's field types.
    """
    from rankwise.decomposition import get_method, method_class
    from rankwise.design.plan import Plan
    from rankwise.design.ranks import parse_rank

    if plan_file is not None:
        if layers is not None or method is not None or method_args:
            raise PlanError("give either --plan FILE or --layers/--tensors/--rank/--method/--method-arg, not both "
                            "(method settings go in the plan: method: {name: asvd, alpha: 0.5})")
        plan = Plan.from_file(plan_file)
        plan = dataclasses.replace(plan, force=True) if force else plan
    elif layers is None:
        raise PlanError("say what to decompose: --plan FILE, or --layers (e.g. 2,17,29 or all) with "
                        "--tensors, --rank and --method")
    else:
        cls = method_class(method or "tucker", "--method: ")
        given = parse_method_args(method_args or [])
        settings = cls.config_class.from_settings(given, "--method-arg ").to_dict()
        spec = {"name": cls.name, **{key: settings[key] for key in given}}
        plan = Plan.simple(layers=layers, tensors=_tensor_list(tensors), rank=parse_rank(rank, "--rank"),
                           method=spec, force=force)
    for spec in plan.methods():
        get_method(spec)
    return plan


def parse_method_args(items: list[str]) -> dict[str, str]:
    """``["alpha=0.25", "solver=gram"]`` -> ``{"alpha": "0.25", "solver": "gram"}`` (a key given twice: the
    last wins, as with repeated flags elsewhere)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise PlanError(f"--method-arg: expected KEY=VALUE (e.g. alpha=0.25), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _tensor_list(text: str) -> str | list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise PlanError("--tensors: empty (use all, attn, mlp or role names like q,k,v)")
    return parts[0] if len(parts) == 1 else parts


@app.command()
def decompose(
    model: Annotated[str, typer.Argument(help="Bundled alias, HF model id, local folder or .gguf file.")] = DEFAULT_MODEL,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder to write the decomposed checkpoint to.")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="Plan file (YAML or JSON).")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers: 2,17,29 or 20-29 or all.")] = None,
    tensors: Annotated[str, typer.Option(help="Roles: all, attn, mlp or q,k,v,o,gate,up,down.")] = "all",
    rank: Annotated[str, typer.Option(help="Int rank, parameter fraction in (0,1), or energy:F.")] = "1",
    method: Annotated[str | None, typer.Option(help="tucker (default), svd, asvd, svd-llm or fwsvd "
                                                     "(case-insensitive).")] = None,
    method_arg: Annotated[list[str] | None, typer.Option(
        "--method-arg", metavar="KEY=VALUE",
        help="A method setting, repeatable: alpha=0.25 (asvd), damping=1e-4 (svd-llm), "
             "solver=auto|gram|krylov|lapack, oversample=2 (any method).")] = None,
    fold: Annotated[str | None, typer.Option(help="auto (Tucker three-factor, others two-factor), true or false; "
                                                  "default: the plan's (auto).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Decompose even above the break-even rank.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: a rankwise "
                                                   "checkpoint's saved dtype, float32 otherwise).")] = None,
    calib_data: Annotated[str, typer.Option(help="Calibration text: wikitext2 (validation split), "
                                                  "wikitext2-test, or a .txt/.jsonl file.")] = "wikitext2",
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (data-aware methods only).")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    calib_seed: Annotated[int, typer.Option(help="Seed for choosing the windows.")] = 0,
    calib_cache: Annotated[bool, typer.Option("--calib-cache/--no-calib-cache",
                                              help="Reuse calibration statistics cached on disk.")] = True,
    data_dir: Annotated[Path | None, typer.Option(help="Data folder (default $RANKWISE_DATA).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report to this JSON file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    streaming: Annotated[bool, typer.Option("--streaming", help="One block at a time from MODEL's safetensors "
                                                                "(memory: one block + calibration buffers).")] = False,
    sequential: Annotated[bool, typer.Option("--sequential", help="With --streaming: calibrate each block on the "
                                                                  "already-compressed earlier blocks.")] = False,
    offload: Annotated[str, typer.Option(help="With --streaming: calibration hidden states in RAM (cpu) or "
                                              "memory-mapped on disk (disk).")] = "cpu",
    device: Annotated[str, typer.Option(help="cpu, cuda (cuda:N) or auto (cuda when available).")] = "cpu",
) -> None:
    """Decompose the planned targets of MODEL and save a checkpoint that loads with rankwise or transformers."""
    from rankwise.calibration.data import CalibrationConfig
    from rankwise.checkpoint import save
    from rankwise.checkpoint.output import check_out_folder, output_lock
    from rankwise.cli.common import check_output_file, hold, on_interrupt
    from rankwise.decomposition.apply import decompose_ as run_decompose
    from rankwise.decomposition.apply import parse_fold
    from rankwise.models import load
    from rankwise.settings import check_data_dir

    # --- everything checkable without the model, before the (slow) load --------------------------------
    if out is None:
        raise RankwiseError("missing --out/-o OUT: the folder to write the decomposed checkpoint to")
    hold(output_lock(out))  # a second run into the same OUT is refused now, not after decomposing
    check_out_folder(out, overwrite)
    check_output_file(json_out, "--json")
    check_data_dir(data_dir)
    on_interrupt(f"{out} was not written" + (" (the previous one is unchanged)" if out.exists() else ""))
    the_plan = build_plan(plan, layers, tensors, rank, method, force, method_arg)
    fold_mode = parse_fold(fold) if fold is not None else None
    calibration = CalibrationConfig(dataset=calib_data, n_samples=calib_samples, seq_len=calib_seq_len,
                                    seed=calib_seed, data_dir=str(data_dir) if data_dir else None)

    from rankwise.devices import resolve_device

    device = resolve_device(device)
    if streaming:
        from rankwise.decomposition.streaming import stream_decompose

        report = stream_decompose(model, out, the_plan, calibration, fold=fold_mode, sequential=sequential,
                                  offload=offload, device=device, dtype=dtype, progress=not quiet,
                                  overwrite=overwrite, name=model)
    else:
        if sequential or offload != "cpu":
            raise RankwiseError("--sequential and --offload apply to --streaming only")
        loaded = load(model, dtype=dtype, device=device)
        report = run_decompose(loaded.model, the_plan, calibration, tokenizer=loaded.tokenizer, fold=fold_mode,
                               progress=not quiet, use_cache=calib_cache, name=model)
        save(loaded.model, out, tokenizer=loaded.tokenizer, report=report, overwrite=overwrite)
    data = report.to_dict()
    data["checkpoint"] = str(out)
    on_interrupt(f"the checkpoint was saved to {out}")
    if json_out is not None:
        write_or_rescue(json_out, lambda path: write_json_atomic(path, data), "the report")
    print_summary(data)


def print_summary(data: dict[str, Any]) -> None:
    """The run in one table (labelled numbers), then any targets kept dense or fallbacks taken."""
    console = Console()
    s = data["summary"]
    table = Table(title=f"rankwise decompose: {data['model']} ({data['dtype']}) -> {data['checkpoint']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    calib = data.get("calibration")
    if calib is None:
        calib_text = "none needed (data-free methods)"
    elif "n_sequences" in calib:
        calib_text = (f"{calib.get('dataset', calib.get('source'))}: {calib['n_sequences']} × {calib['seq_len']} "
                      f"tokens, seed {calib.get('seed', '-')}{' (cached)' if calib.get('cache_hit') else ''}")
    else:
        calib_text = str(calib.get("source"))
    rows = [
        ("targets decomposed", f"{s['targets_decomposed']} of {s['targets_planned']} planned"),
        ("targets kept dense (above break-even)", str(s["targets_kept_dense"])),
        ("parameters before (whole model)", f"{s['params_before']:,}"),
        ("parameters after (whole model)", f"{s['params_after']:,}"),
        ("parameters removed", f"{s['params_removed']:,}"),
        ("reduction of the whole model", f"{s['reduction_pct_of_whole_model']:.3f}%"),
        ("parameter bytes before / after", f"{format_bytes(s['bytes_before'])} / {format_bytes(s['bytes_after'])}"),
        ("mean relative error ‖W−Ŵ‖/‖W‖", "-" if s["mean_rel_error"] is None else f"{s['mean_rel_error']:.4f}"),
        ("mean whitened error ‖(W−Ŵ)S‖/‖WS‖", "-" if s["mean_weighted_error"] is None
         else f"{s['mean_weighted_error']:.4f}"),
        ("calibration", calib_text),
        ("form (fold)", data["fold"]),
        ("seconds", f"{s['seconds']:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for t in data["targets"]:
        if t["kept_dense"]:
            console.print(f"layer {t['layer']} {t['role']}: {t['reason']}")
        for note in t["fallbacks"]:
            console.print(f"layer {t['layer']} {t['role']}: fallback: {note}")
    console.print(f"report: {Path(data['checkpoint']) / 'decomposition_report.json'}")

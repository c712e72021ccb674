"""``rankwise allocate``: choose per-target ranks under a size budget and write a plan ``decompose`` takes.

Everything checkable without the model (unit, budget value, allocator and method names, output path) is
checked before the (slow) load. Outputs: the plan (YAML or JSON by OUT's suffix), ``<stem>.allocation.json``
(budget, achieved size in every unit, per-target choices, profile settings) and ``<stem>.png``/``.svg`` (the
report's rank-map figure of the plan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rankwise.cli.main import app
from rankwise.devices import DEVICE_HELP, resolve_device
from rankwise.errors import PlanError, RankwiseError
from rankwise.models import DEFAULT_MODEL


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PlanError(f"--profile-fractions: '{text}' is not a comma-separated list of numbers") from None
    if not values:
        raise PlanError("--profile-fractions: empty")
    return values


def _compensate(text: str) -> bool | str:
    value = text.strip().lower()
    if value in ("false", "no", "off"):
        return False
    if value in ("true", "yes", "on"):
        return True
    if value == "sequential":
        return "sequential"
    raise PlanError(f"--compensate: '{text}' must be false, true or sequential")


@app.command()
def allocate(
    model: Annotated[str, typer.Argument(help="Bundled alias, HF model id, local folder or .gguf file.")] = DEFAULT_MODEL,
    budget: Annotated[str, typer.Option(help="How much to keep: a fraction in (0,1] (model-params, decoder-params) "
                                             "or bytes (250MB, 240MiB, 123456).")] = "0.8",
    unit: Annotated[str, typer.Option(help="model-params, decoder-params or bytes.")] = "decoder-params",
    method: Annotated[str, typer.Option(help="Decomposition method the plan uses (svd-llm, asvd, svd, tucker).")]
    = "svd-llm",
    allocator: Annotated[str, typer.Option(help="uniform, energy, greedy, knapsack, target, or removal "
                                                "(drop whole blocks instead).")] = "knapsack",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Plan file to write (.yaml or .json).")] = None,
    compensate: Annotated[str, typer.Option(help="Error compensation in the plan: false, true or sequential.")]
    = "false",
    max_loss: Annotated[float | None, typer.Option(help="target allocator: the largest summed predicted proxy "
                                                        "loss (KL nats/token) allowed.")] = None,
    grid: Annotated[int, typer.Option(help="Rank levels per target for greedy/knapsack/target.")] = 32,
    profile_fractions: Annotated[str, typer.Option(help="Kept fractions each target is profiled at.")] = "0.4,0.7",
    profile_samples: Annotated[int, typer.Option(help="Proxy sequences for the sensitivity profile.")] = 2,
    profile_seq_len: Annotated[int, typer.Option(help="Tokens per proxy sequence.")] = 128,
    calib_data: Annotated[str, typer.Option(help="Calibration text for the method's statistics.")] = "wikitext2",
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (data-aware methods only).")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    calib_seed: Annotated[int, typer.Option(help="Seed for choosing the windows.")] = 0,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse cached statistics and profiles.")] = True,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write the rank map (PNG and SVG) next to the plan.")] = True,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: a rankwise "
                                                   "checkpoint's saved dtype, float32 otherwise).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data folder (default $RANKWISE_DATA).")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Allocate ranks for MODEL under a size budget (stated in an explicit unit) and write the plan."""
    from rankwise.allocation.allocators import available_allocators
    from rankwise.allocation.budget import Budget
    from rankwise.allocation.planner import REMOVAL, allocate_plan
    from rankwise.allocation.sensitivity import ProfileSettings
    from rankwise.calibration.data import CalibrationConfig
    from rankwise.decomposition import get_method
    from rankwise.fileio import write_json_atomic, write_text_atomic
    from rankwise.models import load

    if out is None:
        raise RankwiseError("missing --out/-o PLAN: the plan file to write (.yaml or .json)")
    if out.exists() and out.is_dir():
        raise RankwiseError(f"{out} is a folder; give a plan file name such as plan.yaml")
    the_budget = Budget.parse(budget, unit)
    if allocator not in (*available_allocators(), REMOVAL):
        raise PlanError(f"unknown allocator '{allocator}' (known: {', '.join([*available_allocators(), REMOVAL])})")
    if allocator == "target" and max_loss is None:
        raise PlanError("the target allocator needs --max-loss (summed predicted KL, nats/token)")
    if grid < 2:
        raise PlanError(f"--grid: {grid} must be at least 2")
    meth = get_method(method)
    comp = _compensate(compensate)
    device = resolve_device(device)  # an unavailable device is an error before the (slow) load
    settings = ProfileSettings(method=meth.name, fractions=_fractions(profile_fractions), n_samples=profile_samples,
                               seq_len=profile_seq_len, dataset=calib_data)
    calibration = CalibrationConfig(dataset=calib_data, n_samples=calib_samples, seq_len=calib_seq_len,
                                    seed=calib_seed, data_dir=str(data_dir) if data_dir else None)

    loaded = load(model, dtype=dtype, device=device)
    result = allocate_plan(loaded.model, loaded.tokenizer, the_budget, method=meth.name, allocator=allocator,
                           compensate=comp, max_loss=max_loss, calibration=calibration, settings=settings,
                           grid=grid, use_cache=cache, progress=not quiet, name=model)
    text = result.plan.to_json() if out.suffix == ".json" else result.plan.to_yaml()
    write_text_atomic(out, text)
    report_path = out.with_name(out.stem + ".allocation.json")
    data = result.to_dict()
    data["model"] = model
    data["dtype"] = loaded.info.dtype
    write_json_atomic(report_path, data)
    plot_path = _plot_rank_map(result, out, model) if plot else None
    print_summary(result, out, report_path, plot_path)


def _plot_rank_map(result, out: Path, model: str) -> Path:
    """The report's rank-map figure of the allocated plan, as ``PLAN.png`` and ``PLAN.svg`` beside the plan."""
    from rankwise.allocation.planner import rank_map_targets
    from rankwise.reports.plots import rank_map
    from rankwise.reports.style import save_figure

    a = result.achieved
    targets = rank_map_targets(result)
    doc = {"model": model, "plan": {"method": result.plan.method.name}, "fold": "none (allocated plan, not applied)",
           "targets": targets,
           "summary": {"reduction_pct_of_whole_model": 100 * (1 - a["model-params"]),
                       "targets_decomposed": sum(1 for t in targets if t["ranks"])}}
    fig = rank_map(doc, title=f"{result.plan.name}: {a['decoder-params']:.3f} of decoder linear params, "
                              f"{a['model-params']:.3f} of model params kept")
    return save_figure(fig, out.parent, out.stem)["png"]


def print_summary(result, plan_path: Path, report_path: Path, plot_path: Path | None) -> None:
    """One table: budget and unit, achieved size in every unit, what was chosen; then the files written."""
    console = Console()
    a, acc = result.achieved, result.accounting
    table = Table(title=f"rankwise allocate: {result.plan.name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("budget", f"{result.budget.describe()} (unit {result.budget.unit})"),
        ("achieved: kept fraction of model params (model-params)", f"{a['model-params']:.4f}"),
        ("achieved: kept fraction of decoder linear weight params (decoder-params)", f"{a['decoder-params']:.4f}"),
        ("achieved: bytes of parameters (bytes)", f"{int(a['bytes']):,}"),
        ("achieved: parameters (whole model)", f"{int(a['params']):,} of {acc.model_params:,}"),
    ]
    if result.allocation is not None:
        choices = result.allocation.choices.values()
        rows.append(("targets decomposed / left dense", f"{sum(c is not None for c in choices)} / "
                                                        f"{sum(c is None for c in choices)}"))
        if result.allocation.predicted_loss is not None:
            rows.append(("predicted proxy loss (sum of per-target KL, nats/token)",
                         f"{result.allocation.predicted_loss:.4f}"))
    if result.removed_layers:
        rows.append(("blocks removed", ", ".join(str(x) for x in result.removed_layers)))
    if result.profile is not None:
        p = result.profile
        rows.append(("sensitivity profile", f"{len(p.targets)} targets x {len(p.settings.fractions)} ranks, "
                                            f"{p.meta.get('proxy_tokens')} proxy tokens, "
                                            f"{'cached' if p.cache_hit else f'{p.seconds:.0f} s'}"))
    rows.append(("seconds", f"{result.seconds:.1f}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"plan: {plan_path}")
    console.print(f"report: {report_path}")
    if plot_path is not None:
        console.print(f"rank map: {plot_path} (and .svg)")

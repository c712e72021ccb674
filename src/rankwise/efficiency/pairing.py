"""Which two models a benchmark compares: a decomposed model and the dense baseline it must beat.

``rankwise bench`` takes a checkpoint (its recorded source model is the baseline), any model with a plan
(decomposed in memory, the model itself is the baseline), or any model with an explicit baseline (``merged``:
the checkpoint with its factors multiplied out, the dense model's shapes). The pairing is policy, not CLI
plumbing, so Python users and benchmark scripts get the same rules.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rankwise.errors import RankwiseError

#: Baseline name meaning "the checkpoint itself with its factors merged".
MERGED = "merged"


@dataclass
class BenchPair:
    """The two models and their display names, plus what the pairing learned on the way (for the JSON)."""

    dense: nn.Module
    decomposed: nn.Module
    base_name: str
    dec_name: str
    extra: dict[str, Any] = field(default_factory=dict)


def recorded_source(folder: Path) -> str | None:
    """The model a rankwise checkpoint was decomposed from, as its decomposition report names it."""
    from rankwise.checkpoint.format import REPORT_FILE

    try:
        data = json.loads((folder / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    source = data.get("model") if isinstance(data, dict) else None
    return source if isinstance(source, str) and source else None


def _loadable(spec: str) -> bool:
    from rankwise.models import BUNDLED

    return spec in BUNDLED or Path(spec).expanduser().exists()


def check_pairing(model: str, plan: object | None, baseline: str | None) -> bool:
    """Refuse combinations that cannot make a pair, before anything slow; returns whether MODEL is a checkpoint."""
    from rankwise.checkpoint.format import is_checkpoint

    path = Path(model).expanduser()
    checkpoint = path.is_dir() and is_checkpoint(path)
    if plan is None and not checkpoint and baseline is None:
        raise RankwiseError(f"{model} is not a rankwise checkpoint: give --plan FILE to decompose it, or "
                            "--baseline MODEL to compare it with")
    if plan is not None and checkpoint:
        raise RankwiseError(f"{model} is already decomposed: --plan applies to a dense model")
    return checkpoint


def bench_pair(model: str, *, plan: Any = None, plan_name: str = "plan", baseline: str | None = None,
               dtype: str | None = None, device: str = "cpu", progress: bool = True) -> BenchPair:
    """Load (and, with ``plan``, decompose) the model and its baseline at one dtype on one device."""
    from rankwise.checkpoint import load
    from rankwise.efficiency.accounting import disk_bytes
    from rankwise.efficiency.execution import merged_copy

    checkpoint = check_pairing(model, plan, baseline)
    path = Path(model).expanduser()
    loaded = load(model, dtype=dtype, device=device)
    the_dtype = dtype or str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    extra: dict[str, Any] = {}
    if plan is not None:
        from rankwise.decomposition.apply import decompose_ as decompose

        dense = loaded.model
        decomposed = copy.deepcopy(dense)
        report = decompose(decomposed, plan, tokenizer=loaded.tokenizer, progress=progress, name=model)
        extra["decomposition"] = report.summary()
        return BenchPair(dense, decomposed, model, f"{model} + {plan_name}", extra)
    decomposed = loaded.model
    dec_name = path.name if checkpoint else model
    source = baseline or (recorded_source(path) if checkpoint else None)
    if source is None or (baseline is None and not _loadable(source)):
        raise RankwiseError(f"{model}: the checkpoint does not name a loadable source model "
                            f"({source or 'none recorded'}); give --baseline MODEL (or --baseline merged)")
    if source == MERGED:
        dense, base_name = merged_copy(decomposed), "merged (dense-equivalent)"
    else:
        dense, base_name = load(source, dtype=the_dtype, device=device).model, source
    if checkpoint:
        extra["disk_bytes"] = disk_bytes(path)
    if str(next(dense.parameters()).dtype) != str(next(decomposed.parameters()).dtype):
        raise RankwiseError(f"baseline and model dtypes differ ({next(dense.parameters()).dtype} vs "
                            f"{next(decomposed.parameters()).dtype}): compare at the same --dtype")
    return BenchPair(dense, decomposed, base_name, dec_name, extra)

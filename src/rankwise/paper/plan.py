"""The paper's case studies (Moar et al., IISWC 2024) as study specs, one set of sizes per mode.

A *mode* fixes how much is measured, never what: ``quick`` (seeded subsets of a few dozen items, a few
points per sweep; about 11 minutes on 2 idle CPU cores, measured), ``standard`` (100 items per task,
HellaSwag 50; the layer-count and removal sweeps at every second layer count, the findings sweeps at the
points that carry each finding: 58 decoder points, projected at about two hours there from measured
per-item costs, below) and ``full`` (complete test sets, every point, GSM8K
included; for a GPU or a lot of time). Every sweep of the paper is in every mode.

Why ``standard`` is not "a few hundred items per task": on 2 CPU cores one item of each of the six tasks
costs 1.28 s (measured, dense SmolLM2-135M, 2 threads: ARC-E 75 ms, ARC-C 105 ms, HellaSwag 380 ms, MMLU
250 ms, TruthfulQA MC1 200 ms, MC2 270 ms), so 300 items per task at all 89 points of every sweep would take
about 9 hours. Two hours holds 58 points at 100 items (a mean accuracy over six tasks to about ±2 points).

* ``layer-count`` - rank 1 on all tensors of n evenly spaced layers (Fig. 9/10);
* ``layer-removal`` - the same layer sets dropped instead (rank 1 on all 7 tensors leaves a layer nearly
  inert, so removal is the baseline the decomposition must beat);
* ``rank-sweep`` - rank 1 against larger ranks on the same layers (the "rank 1 suffices" finding);
* ``tensor-sensitivity`` - which tensors hurt most;
* ``single-layer`` - each layer alone (the "early layers are sensitive" finding);
* ``layer-density`` - the same number of layers, closer and closer together (the adjacency finding).

The encoder case (the paper's BERT study) is a second study on ``minilm-l6`` with STS-B: a layer-count
sweep measured by Spearman correlation. The plan is built from the model's layer count and roles only, so
it can be printed (and tested) before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError
from rankwise.studies.points import evenly_spaced, expand_grid

MODES = ("quick", "standard", "full")
ENCODER_MODEL = "minilm-l6"
WINOGRANDE_FILE = "winogrande/dev.jsonl"
MMLU_SUBJECTS = 57

#: Items per task (seeded samples, seed 1234) per mode; None = the whole test set. MMLU's sample is drawn
#: from the 57 subjects' questions pooled (a uniform sample; lm-eval's --limit would take N per subject).
TASK_ITEMS: dict[str, dict[str, int | None]] = {
    "quick": {"arc_easy": 25, "arc_challenge": 20, "hellaswag": 12, "mmlu": 20, "truthfulqa_mc1": 15,
              "truthfulqa_mc2": 15},
    "standard": {"arc_easy": 100, "arc_challenge": 100, "hellaswag": 50, "mmlu": 100, "truthfulqa_mc1": 100,
                 "truthfulqa_mc2": 100, "winogrande": 100},
    "full": {"arc_easy": None, "arc_challenge": None, "hellaswag": None, "mmlu": None, "truthfulqa_mc1": None,
             "truthfulqa_mc2": None, "winogrande": None, "gsm8k": None},
}
#: WikiText-2 token perplexity: (windows, tokens per window) per mode; full = the whole test split's windows.
PERPLEXITY = {"quick": (1, 256), "standard": (4, 512), "full": (10_000, 1024)}
EFFICIENCY = {"quick": {"context": 64, "new_tokens": 8, "repeats": 3},
              "standard": {"context": 128, "new_tokens": 16, "repeats": 5},
              "full": {"context": 128, "new_tokens": 64, "repeats": 7}}
ENCODER_ITEMS = {"quick": 200, "standard": 800, "full": None}


@dataclass
class PaperPlan:
    """The studies of one ``rankwise paper`` run, with what was left out and why."""

    mode: str
    model: str
    studies: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    points: dict[str, dict[str, int]] = field(default_factory=dict)  # study -> sweep -> points

    def study(self, kind: str) -> dict[str, Any] | None:
        return next((s for s in self.studies if s["name"].endswith(f"-{kind}")), None)


def winogrande_available(data: Path | None) -> bool:
    return data is not None and (data / WINOGRANDE_FILE).is_file()


def layer_counts(mode: str, n_layers: int, points: int | None = None) -> list[int]:
    """The layer counts of the layer-count and layer-removal sweeps."""
    if mode == "quick":
        ns = [n for n in (1, 2, 3, 4, 6) if n <= n_layers]
    elif mode == "standard":
        ns = sorted({1, *range(2, n_layers + 1, 2)})
    else:
        ns = list(range(1, n_layers + 1))
    return ns[:points] if points else ns


def _tasks(mode: str, items: int | None, winogrande: bool, notes: list[str]) -> list[dict[str, Any]]:
    out = []
    for name, n in TASK_ITEMS[mode].items():
        if name == "winogrande" and not winogrande:
            continue
        if items is not None:
            n = items
        entry: dict[str, Any] = {"name": name} if n is None else {"name": name, "sample": n, "seed": 1234}
        if name == "mmlu" and n is not None:  # n questions drawn from all 57 subjects together
            entry["pooled"] = True
        out.append(entry)
    if not winogrande:
        notes.append(f"winogrande skipped: its data ({WINOGRANDE_FILE}) is not in the data directory "
                     "(no public copy ships with the benchmark data; place the file there to include it)")
    if mode != "full":
        notes.append("gsm8k only in --full: generating answers is too slow on CPU cores for this mode")
    return out


def _sensitivity(groups: Sequence[str]) -> list[dict[str, Any]]:
    """Tensor-sensitivity points: rank 1 on one role (or the ``attn``/``mlp`` group) in every layer."""
    return [{"plan": {"method": "tucker", "rank": 1, "layers": "all", "tensors": [g]}, "label": f"{g}@all",
             "sweep": "tensor-sensitivity"} for g in groups]


def decoder_grid(mode: str, n_layers: int, roles: Sequence[str], points: int | None = None) -> list[dict[str, Any]]:
    """The six sweeps of the paper for a model with ``n_layers`` blocks and these tensor roles."""
    ns = layer_counts(mode, n_layers, points)
    mid = n_layers // 2
    if mode == "quick":
        sens: list[dict[str, Any]] = _sensitivity(("attn", "mlp"))
        singles = sorted({0, 1, mid, n_layers - 1} & set(range(n_layers)))
        ranks: list[Any] = [1, 8, 0.25]
        density = {"preset": "layer-density", "count": 3, "spacings": [s for s in (4, 1) if 2 * s + 1 <= n_layers]}
    elif mode == "standard":
        # each role alone in every layer, and attention vs MLP; the first layers one by one (the early-layer
        # finding) then a few across the depth; 5 layers at spacings 6, 4, 2, 1 (the adjacency finding)
        sens = _sensitivity((*roles, "attn", "mlp"))
        singles = sorted({0, 1, 2, 4, n_layers // 4, mid, 3 * n_layers // 4, n_layers - 1} & set(range(n_layers)))
        ranks = [1, 8, 32, 0.25, 0.5]
        density = {"preset": "layer-density",
                   "spacings": [s for s in (6, 4, 2, 1) if 4 * s + 1 <= n_layers] or [1]}
    else:
        sens = [{"preset": "tensor-sensitivity"}]
        singles = list(range(n_layers))
        ranks = [1, 8, 32, 0.25, 0.5]
        density = {"preset": "layer-density"} if n_layers >= 4 * 6 + 1 else \
            {"preset": "layer-density", "spacings": [s for s in (6, 5, 4, 3, 2, 1) if 4 * s + 1 <= n_layers]}
    if points:
        sens = sens[:points] if mode != "full" else sens
        singles, ranks = singles[:points], ranks[:points]
        if "spacings" in density:
            density["spacings"] = density["spacings"][:points]
    return [
        {"preset": "layer-count", "n": ns},
        {"preset": "layer-removal", "n": ns},
        {"preset": "rank-sweep", "ranks": ranks, "layers": evenly_spaced(min(3, n_layers), n_layers)},
        *sens,
        {"preset": "single-layer", "layers": singles},
        density,
    ]


def build_plan(mode: str, model: str, n_layers: int, roles: Sequence[str], *, data: Path | None,
               encoder_layers: int | None = None, items: int | None = None,
               points: int | None = None, threads: int = 1, device: str = "cpu") -> PaperPlan:
    """The studies of a mode. ``items``/``points`` shrink every task and sweep (tests, smoke runs);
    ``encoder_layers``: the encoder's layer count, or None to leave the encoder case out; ``threads``: torch
    threads per worker (part of each study's identity: latency depends on it); ``device``: where every
    study runs (written into the specs only when not the default cpu, so CPU studies keep their identity)."""
    if mode not in MODES:
        raise RankwiseError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    notes: list[str] = []
    tasks = _tasks(mode, items, winogrande_available(data), notes)
    windows, seq_len = PERPLEXITY[mode]
    if items is not None:
        windows, seq_len = 1, min(seq_len, 64)
    suffix = "" if items is None and points is None else f"-i{items or 0}p{points or 0}"
    decoder = {"name": f"paper-{mode}{suffix}-{model}-decoder", "model": model, "threads": threads,
               "tasks": tasks, "perplexity": {"windows": windows, "seq_len": seq_len},
               "efficiency": dict(EFFICIENCY[mode]) if items is None else
               {"context": 16, "new_tokens": 4, "repeats": 2},
               "grid": decoder_grid(mode, n_layers, roles, points)}
    plan = PaperPlan(mode=mode, model=model, studies=[decoder], notes=notes)
    if encoder_layers is not None:
        n_enc = ENCODER_ITEMS[mode] if items is None else items
        ns = [n for n in ((1, 2, 3) if mode == "quick" else range(1, encoder_layers + 1)) if n <= encoder_layers]
        ns = ns[:points] if points else ns
        plan.studies.append({
            "name": f"paper-{mode}{suffix}-{ENCODER_MODEL}-encoder", "model": ENCODER_MODEL, "threads": threads,
            "tasks": [{"name": "stsb"} if n_enc is None else {"name": "stsb", "sample": n_enc, "seed": 1234}],
            "objectives": [{"metric": "stsb", "direction": "maximize"},
                           {"metric": "params_ratio", "direction": "minimize"}],
            "grid": [{"preset": "layer-count", "n": ns}]})
    if device != "cpu":
        for study in plan.studies:
            study["device"] = device
    return plan


def count_points(study: dict[str, Any], n_layers: int, roles: Sequence[str]) -> dict[str, int]:
    """Points per sweep of one study (expanded exactly as the engine expands them)."""
    out: dict[str, int] = {}
    for p in expand_grid(study["grid"], n_layers, roles):
        out[p.sweep] = out.get(p.sweep, 0) + 1
    return out


def task_items(task: dict[str, Any]) -> str:
    """How many items a task entry measures, in words (MMLU's sample is per subject)."""
    n = task.get("sample")
    if n is None:
        return f"{task['name']} all items"
    if task.get("pooled"):
        return f"{task['name']} {n} items (pooled over its {MMLU_SUBJECTS} subjects)"
    return f"{task['name']} {n} items"


def plan_lines(plan: PaperPlan) -> list[str]:
    """The plan as printed before a run: sweeps, points and items per task, and what is left out."""
    lines = [f"rankwise paper --{plan.mode}: {len(plan.studies)} stud{'y' if len(plan.studies) == 1 else 'ies'}"]
    for s in plan.studies:
        counts = plan.points.get(s["name"], {})
        lines.append(f"  study {s['name']} on {s['model']}: {sum(counts.values())} points + the dense model")
        for sweep, n in counts.items():
            lines.append(f"    {sweep}: {n} points")
        tasks = ", ".join(task_items(t) for t in s["tasks"])
        lines.append(f"    tasks (seeded samples, seed 1234): {tasks}")
        if s.get("perplexity"):
            p = s["perplexity"]
            lines.append(f"    wikitext-2 token perplexity: {p['windows']} window(s) of {p['seq_len']} tokens")
        if s.get("efficiency"):
            e = s["efficiency"]
            lines.append(f"    decode latency: batch 1, {e['new_tokens']} tokens after {e['context']}, "
                         f"median of {e['repeats']}, {s['threads']} thread(s)")
    lines += [f"  note: {n}" for n in plan.notes]
    return lines

"""Evaluation speed: lm-eval 0.4.13 vs rankwise on the same items, same model, same process.

For ARC-Easy (short contexts, 4-5 choices) and HellaSwag (long contexts, 4 long endings) both tools score
the first N items of the local files (lm-eval through its own task configurations pointed at the same data,
see rankwise.evaluation.harness). Prints, per model and task, the scoring strategy rankwise used (and why,
when it is not ``packed``), the continuation tokens scored, wall times, the speed-up, acc and acc_norm of
both, and how far apart the per-item log-likelihoods are; writes everything as JSON.

``--model`` takes any model spec ``rankwise eval`` takes, and may be repeated. ``--as-sliding-window N``
adds, for each Llama-architecture model, the same weights loaded into a ``MistralForCausalLM`` whose config
sets ``sliding_window N`` (N longer than any item: the same outputs), to show that a window in the config
no longer costs speed. ``--lm-head-share`` instead measures which fraction of a packed scoring step the LM
head takes on large-vocabulary shapes, with and without logits restricted to continuation positions.

    .venv/bin/python bench/eval_speed.py [--model SPEC ...] [--arc-items 200] [--hellaswag-items 100]
        [--batch-size 16] [--as-sliding-window 4096] [--lm-head-share]
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
from rankwise.evaluation import engine, harness
from rankwise.evaluation.registry import EvalOptions, get_task
from rankwise.evaluation.runner import evaluate
from rankwise.evaluation.tasks.multiple_choice import requests_for
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

    docs = get_task(task).load_docs(options, 0)[:items]  # type: ignore[attr-defined]
    encoder = engine.PairEncoder(tokenizer)
    scored_tokens = sum(len(encoder.pair(c, x)[1]) for c, x in requests_for(docs))
    a, b = _per_item(ours), _per_item(theirs)
    max_diff = max(abs(x - y) for k in b for x, y in zip(a[k]["loglikelihoods"], b[k]["loglikelihoods"], strict=True))
    pred_mismatch = sum(
        a[k]["pred"] != max(range(len(b[k]["loglikelihoods"])), key=lambda i: (b[k]["loglikelihoods"][i], -i))
        for k in b
    )
    return {
        "task": task, "n": ours.n, "requests": sum(len(s["choices"]) for s in ours.samples),
        "tokens_scored": scored_tokens, "strategy": ours.protocol.get("strategy"),
        "strategy_reason": ours.protocol.get("strategy_reason"),
        "rankwise_loglikelihoods": {k: v["loglikelihoods"] for k, v in a.items()},
        "lm_eval_seconds": lm_eval_s, "rankwise_seconds": rankwise_s, "speedup": lm_eval_s / rankwise_s,
        "lm_eval_cpu_seconds": lm_eval_cpu, "rankwise_cpu_seconds": rankwise_cpu,
        "cpu_speedup": lm_eval_cpu / rankwise_cpu,
        "lm_eval": {"metrics": theirs.metrics, "stderr": theirs.stderr},
        "rankwise": {"metrics": ours.metrics, "stderr": ours.stderr},
        "max_abs_loglikelihood_diff": max_diff, "prediction_mismatches": pred_mismatch,
        "protocol": ours.protocol,
    }


def as_sliding_window(model: torch.nn.Module, window: int) -> torch.nn.Module:
    """The same Llama weights in a ``MistralForCausalLM`` whose config sets ``sliding_window``."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = model.config
    if cfg.model_type != "llama" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise RankwiseError(f"--as-sliding-window needs Llama weights without biases, not {cfg.model_type}")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    config = MistralConfig(**{k: getattr(cfg, k) for k in keep if hasattr(cfg, k)}, sliding_window=window)
    config._attn_implementation = cfg._attn_implementation
    copy = MistralForCausalLM(config).to(next(model.parameters()).dtype).eval()
    copy.load_state_dict(model.state_dict(), strict=True)
    with torch.inference_mode():
        ids = torch.arange(3, 40)[None]
        diff = (copy(ids).logits - model(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RankwiseError(f"the MistralForCausalLM copy differs from the model by {diff:.1e}")
    return copy


def _median_time(fn, device: torch.device) -> float:
    """Median seconds of 5 calls after one warm-up: process CPU time on a CPU (steadier than wall time on a
    shared host; all threads of this process count), wall time with synchronisation on an accelerator."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fn()
    sync()
    times = []
    for _ in range(5):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return sorted(times)[2]


def lm_head_share(device: torch.device) -> list[dict]:
    """Time one packed scoring step of an ARC-like batch (16 questions x 48 tokens, 17 continuation
    positions each) on random models with real large-vocabulary shapes: the body, the LM head + float32
    log-softmax over every position (what a forward without ``logits_to_keep`` does), and over the
    continuation positions only (what rankwise asks for). Median of 5 after a warm-up."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    shapes = {
        "Qwen2.5-0.5B shape (vocab 151,936)": (Qwen2ForCausalLM, Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
        "Gemma-3-270M shape (vocab 262,144)": (Gemma3ForCausalLM, Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512)),
    }
    rows = []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (16, 48), generator=g).to(device)
    keep = torch.zeros((16, 48), dtype=torch.bool, device=device)
    keep[:, -17:] = True
    for label, (cls, config) in shapes.items():
        torch.manual_seed(0)
        model = cls(config).eval().to(device)
        body, head = model.model, model.get_output_embeddings()
        with torch.inference_mode():
            hidden = body(input_ids=ids).last_hidden_state
            t_body = _median_time(lambda m=body: m(input_ids=ids), device)
            t_all = _median_time(lambda h=head, x=hidden: torch.log_softmax(h(x).float(), -1), device)
            t_kept = _median_time(lambda h=head, x=hidden[keep]: torch.log_softmax(h(x).float(), -1), device)
        rows.append({"shape": label, "body_s": t_body, "head_all_positions_s": t_all,
                     "head_continuation_positions_s": t_kept,
                     "head_share_all_positions": t_all / (t_body + t_all),
                     "head_share_continuation_positions": t_kept / (t_body + t_kept),
                     "step_speedup": (t_body + t_all) / (t_body + t_kept)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help=f"model spec (repeatable; default {DEFAULT_MODEL})")
    parser.add_argument("--arc-items", type=int, default=200)
    parser.add_argument("--hellaswag-items", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval: sequences, rankwise: contexts")
    parser.add_argument("--as-sliding-window", type=int, default=None, metavar="N",
                        help="also run each Llama model's weights in a MistralForCausalLM with sliding_window N")
    parser.add_argument("--lm-head-share", action="store_true",
                        help="measure the LM head's share of a scoring step on large-vocabulary shapes instead")
    parser.add_argument("--device", default="cpu", help="--lm-head-share only: cpu or cuda")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="default bench/results/eval_speed.json "
                                                     "(eval_lm_head.json with --lm-head-share)")
    args = parser.parse_args(argv)
    if args.data_dir is None and not os.environ.get("RANKWISE_DATA"):
        sibling = Path(__file__).resolve().parents[2] / "shared" / "data"  # the checkout's CI layout
        args.data_dir = str(sibling) if sibling.is_dir() else None
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=220)
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine()}

    if args.lm_head_share:
        device = torch.device(args.device)
        rows = lm_head_share(device)
        clock = "wall" if device.type == "cuda" else "CPU (process)"
        table = Table(title=f"LM head share of one packed scoring step (16 rows x 48 tokens, 17 scored per row), "
                            f"float32, {args.device}, {torch.get_num_threads()} threads, random weights, "
                            f"{clock} seconds, median of 5")
        for col in ("shape", "body s", "head+log-softmax, all positions s", "share",
                    "head+log-softmax, continuation positions s", "share", "step speed-up"):
            table.add_column(col, justify="left" if col == "shape" else "right")
        for r in rows:
            table.add_row(r["shape"], f"{r['body_s']:.3f}", f"{r['head_all_positions_s']:.3f}",
                          f"{r['head_share_all_positions']:.0%}", f"{r['head_continuation_positions_s']:.3f}",
                          f"{r['head_share_continuation_positions']:.0%}", f"{r['step_speedup']:.2f}x")
        console.print(table)
        path = args.json or "bench/results/eval_lm_head.json"
        write_json_atomic(path, {**env, "device": args.device, "clock": clock,
                                 "load_average_at_end": os.getloadavg(), "results": rows})
        console.print(f"written to {path}")
        return 0

    models = []
    for spec in args.model or [DEFAULT_MODEL]:
        model, tokenizer, info = load(spec)
        models.append((info.name, model, tokenizer, info))
        if args.as_sliding_window:
            models.append((f"{info.name} as MistralForCausalLM, sliding_window {args.as_sliding_window}",
                           as_sliding_window(model, args.as_sliding_window), tokenizer, info))
    rows = []
    for label, model, tokenizer, _ in models:
        with torch.inference_mode():  # warm-up, so neither tool pays first-call costs
            model(torch.ones((1, 16), dtype=torch.long))
        for task, items in (("arc_easy", args.arc_items), ("hellaswag", args.hellaswag_items)):
            if items > 0:
                console.print(f"[bold]{label}[/bold] {task}: {items} items, lm-eval then rankwise ...")
                rows.append({"model": label, **compare(model, tokenizer, task, items, args.batch_size,
                                                       args.data_dir)})

    table = Table(title=f"evaluation wall time, float32, batch {args.batch_size}, "
                        f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    for col in ("model", "task", "strategy", "n (requests)", "tokens scored", "lm-eval s", "rankwise s",
                "speed-up", "CPU s lm-eval / rankwise", "CPU speed-up", "lm-eval acc / acc_norm",
                "rankwise acc / acc_norm", "max |Δ ll|", "pred. mismatches"):
        table.add_column(col, justify="left" if col in ("model", "task", "strategy") else "right")
    for r in rows:
        lm, rw = r["lm_eval"]["metrics"], r["rankwise"]["metrics"]
        table.add_row(r["model"], r["task"], str(r["strategy"]), f"{r['n']} ({r['requests']})",
                      str(r["tokens_scored"]), f"{r['lm_eval_seconds']:.1f}",
                      f"{r['rankwise_seconds']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['lm_eval_cpu_seconds']:.1f} / {r['rankwise_cpu_seconds']:.1f}", f"{r['cpu_speedup']:.2f}x",
                      f"{lm['acc']:.4f} / {lm['acc_norm']:.4f}", f"{rw['acc']:.4f} / {rw['acc_norm']:.4f}",
                      f"{r['max_abs_loglikelihood_diff']:.1e}", str(r["prediction_mismatches"]))
    console.print(table)
    for r in rows:
        if r["strategy"] != "packed":
            console.print(f"{r['model']} {r['task']}: strategy {r['strategy']} because {r['strategy_reason']}")
    first = {}
    for r in rows:  # models after the first on the same task: same rankwise log-likelihoods?
        ref = first.setdefault(r["task"], r)
        if ref is not r:
            a, b = ref["rankwise_loglikelihoods"], r["rankwise_loglikelihoods"]
            worst = max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))
            same = sum(max(range(len(a[k])), key=a[k].__getitem__) == max(range(len(b[k])), key=b[k].__getitem__)
                       for k in a)
            r["vs_first_model"] = {"max_abs_loglikelihood_diff": worst, "same_predictions": same, "n": len(a)}
            console.print(f"{r['model']} vs {ref['model']} on {r['task']}: max |Δ ll| {worst:.1e}, "
                          f"same prediction on {same}/{len(a)} items")
    console.print("acc = argmax of summed log-likelihood; acc_norm = per-character normalised (lm-eval); "
                  "first N items of each local file (lm-eval --limit N); both tools in one process, same "
                  "threads. Wall seconds; CPU seconds (process time, all threads) are steadier on a busy host. "
                  "tokens scored = continuation tokens whose log-probability is summed.")
    doc = {"models": [{"label": label, **info.to_dict()} for label, _, _, info in models],
           "batch_size": args.batch_size, **env, "load_average_at_end": os.getloadavg(), "results": rows}
    path = args.json or "bench/results/eval_speed.json"
    write_json_atomic(path, doc)
    console.print(f"written to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

"""WikiText-2 perplexity of a model: the number, the wall time, and rankwise's scorer against a plain loop.

1. Baseline vs rankwise on the first K windows (same process, same windows): the GPTQ-style loop (one
   window per forward pass, full logits, ``CrossEntropyLoss`` over the shifted sequence) against
   :func:`rankwise.evaluation.perplexity.score_windows` (batched, LM head only at target positions,
   chunked log-softmax). Prints both perplexities (they must agree) and the speed ratio.
2. The ``wikitext_token`` task over the whole test set (or ``--limit`` windows): token-level perplexity
   in non-overlapping ``--seq-len`` windows, the compression papers' protocol, with its wall time.
3. With ``--rolling``: lm-eval's ``wikitext`` task (rolling windows over the 62 documents; word and byte
   perplexity, bits per byte), which is slower and not comparable with step 2.

    .venv/bin/python bench/perplexity.py [--seq-len 2048] [--limit N] [--rolling] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from rich.console import Console
from rich.table import Table

from rankwise.errors import RankwiseError
from rankwise.evaluation.perplexity import encode, score_windows, token_perplexity, token_windows
from rankwise.evaluation.registry import EvalOptions, Task, get_task
from rankwise.evaluation.tasks import wikitext
from rankwise.fileio import write_json_atomic
from rankwise.models import DEFAULT_MODEL, load


def baseline_loop(model, ids: list[int], seq_len: int, n_windows: int) -> float:
    """GPTQ's ``llama_eval`` perplexity loop on the first windows: exp(mean of per-window mean losses)."""
    losses = []
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.inference_mode():
        for w in range(n_windows):
            x = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
            logits = model(x).logits
            losses.append(float(loss_fn(logits[0, :-1].float(), x[0, 1:])))
    return math.exp(sum(losses) / len(losses))


def compare(model, ids: list[int], seq_len: int, n_windows: int, batch_size: int) -> dict:
    windows = token_windows(ids, seq_len)[:n_windows]
    start = time.perf_counter()
    base_ppl = baseline_loop(model, ids, seq_len, len(windows))
    base_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = token_perplexity(score_windows(model, windows, batch_size=batch_size, token_budget=max(seq_len, 4096)))
    ours_s = time.perf_counter() - start
    return {"windows": len(windows), "predicted_tokens": ours.n_tokens, "baseline_ppl": base_ppl,
            "rankwise_ppl": ours.ppl, "baseline_seconds": base_s, "rankwise_seconds": ours_s,
            "speedup": base_s / ours_s}


def _save(path: str, doc: dict, complete: bool) -> None:
    """Write the results so far (a long run that dies keeps its finished stages)."""
    write_json_atomic(path, {**doc, "complete": complete})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N windows (default: all)")
    parser.add_argument("--baseline-windows", type=int, default=4, help="windows for the baseline comparison")
    parser.add_argument("--rolling", action="store_true", help="also run lm-eval's rolling 'wikitext' task")
    parser.add_argument("--rolling-limit", type=int, default=None, help="documents for --rolling (default: all 62)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default="bench/results/perplexity.json")
    args = parser.parse_args(argv)
    if args.data_dir is None and not os.environ.get("RANKWISE_DATA"):
        sibling = Path(__file__).resolve().parents[2] / "shared" / "data"  # the checkout's CI layout
        args.data_dir = str(sibling) if sibling.is_dir() else None
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    model, tokenizer, info = load(args.model)
    data_dir = Path(args.data_dir) if args.data_dir else None
    options = EvalOptions(data_dir=data_dir, seq_len=args.seq_len, limit=args.limit, batch_size=args.batch_size)
    rows = wikitext.dataset_rows(wikitext.read_raw(Task.data_path(options, wikitext.DATA_FILE)))
    ids = encode(tokenizer, "\n\n".join(rows))

    doc: dict = {"model": info.to_dict(), "seq_len": args.seq_len, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    comparison = None
    if args.baseline_windows > 0:
        console.print(f"[bold]baseline vs rankwise[/bold] on the first {args.baseline_windows} windows ...")
        comparison = compare(model, ids, args.seq_len, args.baseline_windows, args.batch_size)
        doc["comparison"] = comparison
        _save(args.json, doc, complete=False)

    console.print(f"[bold]wikitext_token[/bold]: {len(ids)} tokens, seq-len {args.seq_len} ...")
    token = get_task("wikitext_token").run(model, tokenizer, options)
    doc["wikitext_token"] = token.to_dict()
    _save(args.json, doc, complete=not args.rolling)
    console.print(f"wikitext_token: ppl {token.metrics['token_perplexity']:.4f} over {token.n} windows "
                  f"in {token.seconds:.1f} s")
    tokens_per_s = token.n * args.seq_len / token.seconds

    rolling = None
    if args.rolling:
        console.print("[bold]wikitext[/bold] (lm-eval rolling) ...")
        roll_options = EvalOptions(data_dir=data_dir, limit=args.rolling_limit, batch_size=1)
        rolling = get_task("wikitext").run(model, tokenizer, roll_options)
        doc["wikitext"] = rolling.to_dict()
    doc["load_average_at_end"] = os.getloadavg()
    _save(args.json, doc, complete=True)

    table = Table(title=f"WikiText-2 raw test, {info.name} {info.dtype}, {torch.get_num_threads()} threads, "
                        f"load avg {os.getloadavg()[0]:.1f}")
    for col in ("measurement", "n", "value", "stderr", "wall s", "note"):
        table.add_column(col, justify="left" if col in ("measurement", "note") else "right")
    if comparison:
        n_win = f"{comparison['windows']} win"
        table.add_row(f"token ppl {args.seq_len}, baseline", n_win, f"{comparison['baseline_ppl']:.4f}", "",
                      f"{comparison['baseline_seconds']:.1f}", "GPTQ loop")
        table.add_row(f"token ppl {args.seq_len}, rankwise", n_win, f"{comparison['rankwise_ppl']:.4f}", "",
                      f"{comparison['rankwise_seconds']:.1f}", f"{comparison['speedup']:.2f}x baseline")
    err = token.stderr["token_perplexity"]
    table.add_row(f"wikitext_token ppl {args.seq_len}", f"{token.n} win", f"{token.metrics['token_perplexity']:.4f}",
                  "" if err is None else f"{err:.4f}", f"{token.seconds:.1f}", f"{tokens_per_s:.0f} tok/s")
    if rolling is not None:
        for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            e = rolling.stderr[key]
            table.add_row(f"wikitext {key}", f"{rolling.n} docs", f"{rolling.metrics[key]:.4f}",
                          "" if e is None else f"{e:.4f}", f"{rolling.seconds:.1f}",
                          f"rolling {rolling.protocol['max_length']}")
    console.print(table)
    console.print(f"token ppl: exp(mean NLL) over non-overlapping {args.seq_len}-token windows of the joined test "
                  "rows, last partial window dropped (GPTQ/SVD-LLM); wikitext: lm-eval 0.4.13 rolling "
                  "loglikelihood of the 62 documents, per word / byte of the original text. stderr: "
                  "window- / document-level (delta method).")
    console.print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RankwiseError as exc:  # e.g. no data directory: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)

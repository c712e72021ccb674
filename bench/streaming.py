"""Memory target: streaming decomposition's peak RSS stays near one block plus calibration buffers, whatever
the model's depth; the whole-model path grows with the model.

Protocol (one run, one machine):

* models: SmolLM2-135M's safetensors (30 blocks, float32) and deeper copies of it (its blocks repeated,
  ``rankwise.decomposition.streaming.repeat_blocks``): 30, 60 and 120 blocks by default. ``--shape
  tinyllama``: blocks of TinyLlama-1.1B's shape (2048 wide, MLP 5632, 4 KV heads; 168 MiB in float32) with
  seeded random weights, SmolLM2's tokenizer and vocabulary, repeated to 11 and 22 blocks (22 is
  TinyLlama's depth: a 4.1 GB model). Memory does not depend on the weights' values; what this shows is
  the peak at a block size where the fixed costs below no longer outweigh a block;
* plan (both modes): SVD-LLM at rank 8 on q_proj of the first and the last block, calibration 8 windows x
  128 tokens of WikiText-2 validation, so the calibration set flows through every block;
* each mode runs in a fresh child process (OMP_NUM_THREADS=1). The child imports torch, transformers and
  rankwise, then warms up: both pipelines (whole and streaming) once on a tiny random Llama (64 wide, 2
  blocks, a 64-word tokenizer, calibrated from the same text), the same in both modes, so the pages of
  library code mapped on first use (about 20 MiB of libtorch), the modules transformers imports lazily
  and one-time runtime buffers are not counted as work (the table prints this warm-up's cost).
  The warm-up's ``stream_decompose`` also fixes glibc's mmap threshold for the process
  (``release_freed_memory``), so both modes run under the same allocator setting (whole-model numbers
  are lower than in runs before this protocol: 664 -> 578 MiB at 30 blocks).
  It then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), reads its RSS (the baseline),
  does the work (whole: ``rankwise.load`` + ``decompose`` + ``save``; streaming: ``stream_decompose``) and
  reads its peak RSS (VmHWM). "work peak" = peak - baseline: the memory the decomposition itself needed,
  the model's tokenizer included;
* reference sizes: model bytes (its safetensors files), one block's bytes, and the calibration buffers (two
  N x L x d hidden-state stores in the model dtype). The non-block tensors (embeddings, final norm, head) are
  never whole in memory in streaming mode: they are copied to the output in chunks, and calibration reads
  only the embedding rows of the tokens it uses;
* ratios: whole / streaming work peak (same run), streaming work peak / (one block + calibration buffers).

Target: streaming work peak < 3x (one block + calibration buffers) at every depth, and flat in depth.

    .venv/bin/python bench/streaming.py                 # ~3 min on 2 cores (measured 2 min 33 s)
    .venv/bin/python bench/streaming.py --depths 30,60  # shorter
    .venv/bin/python bench/streaming.py --depths 30 --calib-samples 128 --calib-seq-len 512 \
        --json bench/results/streaming-default-calibration.json   # rankwise's default calibration, ~9 min
    .venv/bin/python bench/streaming.py --shape tinyllama  # 1.1B-shaped blocks, ~5 min, 9 GB of disk at most

The default 8 x 128-token calibration on SmolLM2's 14 MiB blocks is the stress case: its buffers (4.5 MiB)
are a third of one block, so fixed costs that do not grow with the model (the tokenizer, about 40 MiB
at its peak; a calibration batch's activations; the solver's workspace) weigh most, and the 3x target is
not met there (3.3-3.5x, measured). It is met at rankwise's default calibration (1.3x) and on 1.1B-shaped
blocks with the same 8 x 128 set (1.9x); see the README's table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, tempfile, time
    import torch, transformers, rankwise
    from transformers import LlamaConfig, LlamaForCausalLM
    from rankwise.calibration.data import CalibrationConfig
    from rankwise.decomposition.streaming import stream_decompose
    from rankwise.checkpoint import save
    from rankwise.models import load
    from rankwise.decomposition.apply import decompose_ as decompose

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    imported = status("VmRSS")
    # warm-up, the same in both modes: both pipelines once on a tiny random Llama, so the library code they
    # run (pages of libtorch mapped on first use) and one-time runtime buffers are in the baseline
    with tempfile.TemporaryDirectory() as tiny:
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tiny + "/src")
        # a 64-word tokenizer, so the warm-up takes the measured run's path (tokenizer loaded from the folder,
        # calibration text read and encoded) and the tokenizer modules transformers imports lazily, on first
        # use, are in the baseline like the rest of the library
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(63)} | {"[UNK]": 63}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tiny + "/src")
        del words
        text = CalibrationConfig(n_samples=4, seq_len=32)
        tiny_plan = {"layers": "all", "tensors": "all", "rank": 4, "method": "svd-llm"}
        loaded = load(tiny + "/src")
        decompose(loaded.model, tiny_plan, text, tokenizer=loaded.tokenizer, progress=False, use_cache=False)
        save(loaded.model, tiny + "/whole", tokenizer=loaded.tokenizer)
        del loaded
        stream_decompose(tiny + "/src", tiny + "/stream", tiny_plan, text, progress=False)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    mode, src, out, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    calibration = CalibrationConfig(n_samples=int(sys.argv[5]), seq_len=int(sys.argv[6]))
    t = time.perf_counter()
    if mode == "whole":
        loaded = load(src)
        decompose(loaded.model, plan, calibration, tokenizer=loaded.tokenizer, progress=False, use_cache=False)
        save(loaded.model, out, tokenizer=loaded.tokenizer)
    else:
        stream_decompose(src, out, plan, calibration, progress=False)
    print(json.dumps({"imported": imported, "baseline": base, "peak": status("VmHWM"),
                      "seconds": time.perf_counter() - t}))
""")


def run_child(mode: str, src: Path, out: Path, plan: dict, n: int, seq_len: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), json.dumps(plan), str(n),
                           str(seq_len)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


#: Synthetic block shapes (``--shape``): a real model's width, random weights. Memory does not depend on the
#: weights' values, so this measures the peak at the block sizes of larger models, where a fixed cost (the
#: tokenizer, one-time solver workspace) no longer weighs as much as it does against SmolLM2's 14 MiB blocks.
SHAPES = {
    "tinyllama": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
                  "num_key_value_heads": 4},  # TinyLlama-1.1B's block: 168 MiB in float32
}


def synthetic_model(shape: str, original: Path, dest: Path) -> Path:
    """A one-block Llama of ``shape`` with random (seeded) weights, SmolLM2's tokenizer and vocabulary (so the
    calibration text and token ids are the bundled model's) and tied embeddings, saved as safetensors."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from rankwise.decomposition.streaming import TokenizerFiles

    config = AutoConfig.from_pretrained(original)
    for key, value in {**SHAPES[shape], "num_hidden_layers": 1, "tie_word_embeddings": True}.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    TokenizerFiles(original).save_pretrained(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default=None,
                        help="block counts to measure (default 30,60,120; 30 = the real model; with --shape 11,22)")
    parser.add_argument("--shape", choices=["smollm2", *SHAPES], default="smollm2",
                        help="smollm2: the bundled model's real blocks; tinyllama: TinyLlama-1.1B-shaped blocks "
                             "(hidden 2048, MLP 5632, 32 heads, 4 KV heads) with random weights")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None,
                        help="default bench/results/streaming.json (streaming-<shape>.json with --shape)")
    args = parser.parse_args()
    depths = [int(d) for d in (args.depths or ("30,60,120" if args.shape == "smollm2" else "11,22")).split(",")]
    out_json = args.json or Path(__file__).parent / "results" / (
        "streaming.json" if args.shape == "smollm2" else f"streaming-{args.shape}.json")

    import shutil

    import torch

    from rankwise.decomposition.streaming import (
        SafetensorsSource,
        block_bytes,
        build_skeleton,
        repeat_blocks,
        source_folder,
    )
    from rankwise.models.adapters import adapter_for

    with tempfile.TemporaryDirectory(prefix="rankwise-bench-streaming-") as tmp:
        bundled = source_folder("smollm2-135m")
        base = bundled if args.shape == "smollm2" else synthetic_model(args.shape, bundled, Path(tmp) / "base")
        base_depth = 30 if args.shape == "smollm2" else 1
        skeleton = build_skeleton(base, torch.float32)
        adapter = adapter_for(skeleton)
        block = block_bytes(base)
        src = SafetensorsSource.open(base)
        stem = sum(4 * math.prod(src.entries[k]["shape"]) for k in src.files if adapter.layer_of(k) is None)
        hidden = skeleton.config.hidden_size
        del skeleton, src
        buffers = 2 * args.calib_samples * args.calib_seq_len * hidden * 4
        budget = block + buffers
        rows = []
        for depth in depths:
            folder = base if depth == base_depth else repeat_blocks(base, Path(tmp) / f"d{depth}", depth)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            plan = {"layers": [0, depth - 1], "tensors": ["q"], "rank": 8, "method": "svd-llm"}
            got = {}
            for mode in ("whole", "streaming"):
                out = Path(tmp) / f"out-{mode}-{depth}"
                got[mode] = run_child(mode, folder, out, plan, args.calib_samples, args.calib_seq_len)
                shutil.rmtree(out, ignore_errors=True)  # the disk holds one output at a time
                print(f"depth {depth} {mode}: {json.dumps(got[mode])}", file=sys.stderr, flush=True)
            w = got["whole"]["peak"] - got["whole"]["baseline"]
            s = got["streaming"]["peak"] - got["streaming"]["baseline"]
            rows.append({"blocks": depth, "model_bytes": size, "whole_peak": got["whole"]["peak"],
                         "whole_work": w, "stream_peak": got["streaming"]["peak"], "stream_work": s,
                         "baseline": got["streaming"]["baseline"],
                         "warmup": {m: got[m]["baseline"] - got[m]["imported"] for m in got},
                         "whole_s": got["whole"]["seconds"],
                         "stream_s": got["streaming"]["seconds"], "whole_over_stream": w / s,
                         "stream_over_budget": s / budget})
            if folder != base:
                shutil.rmtree(folder)
    name = "SmolLM2-135M's blocks" if args.shape == "smollm2" else f"{args.shape}-shaped blocks"
    details = "" if args.shape == "smollm2" else (
        f" ({', '.join(f'{k} {v}' for k, v in SHAPES[args.shape].items())}; random weights, SmolLM2's tokenizer "
        f"and vocabulary)")
    print(f"model: {name}{details}")
    print(f"one block {mib(block)} MiB; non-block tensors (embeddings, norm; never whole in memory when "
          f"streaming) {mib(stem)} MiB; calibration buffers 2 x {args.calib_samples} x {args.calib_seq_len} x "
          f"{hidden} x 4 B = {mib(buffers)} MiB; budget one block + buffers = {mib(budget)} MiB")
    warm = max(v for r in rows for v in r["warmup"].values())
    print(f"peak RSS in MiB (work = peak - baseline, same child; baseline = RSS after imports and the warm-up, "
          f"which added at most {mib(warm)} MiB); SVD-LLM rank 8 on q of the first and last block")
    head = (f"{'blocks':>6} {'model':>7} {'whole peak':>10} {'whole work':>10} {'stream peak':>11} {'stream work':>11} "
            f"{'whole/stream':>12} {'stream/budget':>13} {'whole s':>7} {'stream s':>8}")
    print(head)
    for r in rows:
        print(f"{r['blocks']:>6} {mib(r['model_bytes']):>7} {mib(r['whole_peak']):>10} {mib(r['whole_work']):>10} "
              f"{mib(r['stream_peak']):>11} {mib(r['stream_work']):>11} {r['whole_over_stream']:>12.2f} "
              f"{r['stream_over_budget']:>13.2f} {r['whole_s']:>7.0f} {r['stream_s']:>8.0f}")
    ok = all(r["stream_over_budget"] < 3 for r in rows)
    missed = [str(r["blocks"]) for r in rows if r["stream_over_budget"] >= 3]
    print(f"target streaming work peak < 3x (one block + calibration buffers): "
          f"{'met at every depth' if ok else 'NOT met at ' + ', '.join(missed) + ' blocks'} "
          f"({name}, calibration {args.calib_samples} x {args.calib_seq_len})")
    growth = rows[-1]["stream_work"] / rows[0]["stream_work"]
    print(f"streaming work peak at {rows[-1]['blocks']} blocks / at {rows[0]['blocks']} blocks: {growth:.2f}x "
          f"(model {rows[-1]['model_bytes'] / rows[0]['model_bytes']:.2f}x; whole-model work "
          f"{rows[-1]['whole_work'] / rows[0]['whole_work']:.2f}x)")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    from rankwise.fileio import write_json_atomic

    write_json_atomic(out_json, {"shape": args.shape, "block_bytes": block, "stem_bytes": stem,
                                 "calibration_buffer_bytes": buffers, "budget_bytes": budget,
                                 "budget": "one block + calibration buffers", "stream_work_growth": growth,
                                 "calibration": {"n_samples": args.calib_samples, "seq_len": args.calib_seq_len},
                                 "rows": rows, "target_met": ok})


if __name__ == "__main__":
    main()

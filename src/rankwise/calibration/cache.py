"""On-disk cache of calibration statistics, so a second run with the same settings skips the model pass.

The key is a content hash of everything that decides the numbers: the model's weights (names, dtypes,
shapes and bytes of its state dict), the calibration token windows themselves (which pins the dataset,
tokenizer, N, L and seed at once) and the requested statistics per module. A stale entry is therefore
impossible short of a hash collision; an edited model or a different seed simply misses.

Entries are safetensors files (``$RANKWISE_CACHE/calibration/<key>.safetensors``), never pickles, written
to a temp file and renamed so a killed run leaves no half entry. Tensors shared by modules that read the
same input (q, k, v) are stored once; the file's metadata maps each module's field to its tensor.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.calibration.stats import CalibrationStats, StatsRequest, collect_stats
from rankwise.fileio import atomic_path
from rankwise.settings import cache_dir

FORMAT_VERSION = 1
_TENSOR_FIELDS = ("gram", "act_abs_mean", "act_sq_mean", "fisher")


@dataclass(frozen=True)
class CalibrationRun:
    """How the statistics were obtained, for the decomposition report."""

    key: str
    cache_hit: bool
    path: str | None
    seconds: float
    n_sequences: int
    seq_len: int
    n_tokens: int
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "cache_hit": self.cache_hit, "path": self.path, "seconds": self.seconds,
                "n_sequences": self.n_sequences, "seq_len": self.seq_len, "n_tokens": self.n_tokens,
                **self.settings}


def model_fingerprint(model: nn.Module) -> str:
    """blake2b of the model's state dict (names, dtypes, shapes, raw bytes); ~1 s per GB."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in model.state_dict(keep_vars=False).items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def stats_key(model_hash: str, input_ids: torch.Tensor, request: StatsRequest) -> str:
    """The cache key: model content, exact token windows, and which statistics of which modules."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"rankwise-calibration-v{FORMAT_VERSION}|{model_hash}|{tuple(input_ids.shape)}\n".encode())
    h.update(input_ids.to(torch.int64).cpu().contiguous().numpy().tobytes())
    h.update(json.dumps({k: sorted(v) for k, v in sorted(request.items())}).encode())
    return h.hexdigest()


def cache_path(key: str) -> Path:
    return cache_dir() / "calibration" / f"{key}.safetensors"


def save_stats(path: Path, stats: Mapping[str, CalibrationStats], metadata: Mapping[str, Any]) -> None:
    """Write stats atomically, each distinct tensor once."""
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[int, str] = {}
    index: dict[str, dict[str, Any]] = {}
    for name, st in stats.items():
        entry: dict[str, Any] = {"n_tokens": st.n_tokens}
        for f in _TENSOR_FIELDS:
            t = getattr(st, f)
            if t is None:
                continue
            if id(t) not in stored:
                stored[id(t)] = f"{name}.{f}"
                tensors[stored[id(t)]] = t.detach().cpu().contiguous()
            entry[f] = stored[id(t)]
        index[name] = entry
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"rankwise": json.dumps({"index": index, **metadata})})


def load_stats(path: Path) -> dict[str, CalibrationStats] | None:
    """The stats stored at ``path``, or None if the entry is missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("rankwise", "{}"))
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError):
        return None
    index = meta.get("index")
    if not isinstance(index, dict):
        return None
    out: dict[str, CalibrationStats] = {}
    for name, entry in index.items():
        st = CalibrationStats(n_tokens=int(entry.get("n_tokens", 0)))
        for f in _TENSOR_FIELDS:
            if f in entry:
                if entry[f] not in tensors:
                    return None
                setattr(st, f, tensors[entry[f]])
        out[name] = st
    return out


def cached_stats(model: nn.Module, input_ids: torch.Tensor, request: StatsRequest,
                 settings: Mapping[str, Any] | None = None, batch_size: int = 4, use_cache: bool = True,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[dict[str, CalibrationStats], CalibrationRun]:
    """The requested statistics: from the cache when the same model, tokens and request were seen before,
    else collected (one pass) and stored."""
    request = {name: frozenset(fields) for name, fields in request.items() if fields}
    t0 = time.perf_counter()
    key = stats_key(model_fingerprint(model), input_ids, request)
    path = cache_path(key)
    stats = load_stats(path) if use_cache else None
    hit = stats is not None and set(stats) == set(request)
    if not hit:
        stats = collect_stats(model, input_ids, request, batch_size=batch_size, progress=progress)
        if use_cache:
            save_stats(path, stats, {"settings": dict(settings or {}), "shape": list(input_ids.shape)})
    assert stats is not None
    n_seq, seq_len = (int(s) for s in input_ids.shape)
    run = CalibrationRun(key=key, cache_hit=hit, path=str(path) if use_cache else None,
                         seconds=time.perf_counter() - t0, n_sequences=n_seq, seq_len=seq_len,
                         n_tokens=n_seq * seq_len, settings=dict(settings or {}))
    return stats, run

"""Loaded weights are the saved weights: no tensor silently random, no cache entry silently damaged.

transformers fills a tensor that a checkpoint lacks with random values and only logs it (rankwise's CLI
mutes those logs), ignores tensors the model has no place for, and reports shape mismatches by pointing at
a log report. :func:`check_loading_info` turns its loading info into one error naming the tensors, so a
damaged folder or a ``config.json`` that disagrees with its weights can never be evaluated as if it were
the model.

Converted GGUF models are cached as safetensors folders; :func:`record_files` notes each file's size and
SHA-256 when the conversion finishes, and :func:`verify_files` checks them on every load (sizes always;
hashes when a file's modification time changed since it was recorded, so an intact entry costs no
re-hashing), so a truncated or altered entry is found and rebuilt instead of failing every later run.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rankwise.errors import ModelLoadError

_SHOWN = 3


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _shape(value: Any) -> str:
    return "x".join(str(int(d)) for d in value) if value is not None else "?"


def check_loading_info(info: Mapping[str, Any], source: str | os.PathLike[str]) -> None:
    """A one-line ModelLoadError if any tensor was missing, unexpected or of the wrong shape.

    Missing tensors come first (they would be random), then mismatched shapes (also random: transformers
    re-initialises them under ``ignore_mismatched_sizes``), then tensors the model has no place for."""
    missing = set(info.get("missing_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the weights (they would be random): "
                        f"{_names(missing)}")
    if mismatched:
        shown = sorted(mismatched, key=lambda m: str(m[0]))
        described = [f"{m[0]} (file {_shape(m[1])}, model {_shape(m[2])})" if len(m) >= 3 else str(m[0])
                     for m in shown]
        extra = f" and {len(described) - _SHOWN} more" if len(described) > _SHOWN else ""
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape: {', '.join(described[:_SHOWN])}{extra}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model has no place for: {_names(unexpected)}")
    if problems:
        raise ModelLoadError(f"{source}: the weights do not match the model its config.json describes: "
                             f"{'; '.join(problems)} (the folder is damaged, or config.json and the "
                             f".safetensors files come from different models)")


def outside_declared_model(model: Any, info: Mapping[str, Any]) -> dict[str, Any]:
    """``info`` without the differences that come from loading another class than the checkpoint declares.

    An encoder saved as ``BertForMaskedLM`` is loaded as the base ``BertModel``: its head's tensors have no
    place in the base model, and the base model's pooler (absent from ``BertForMaskedLM``) has no tensors in
    the file. Neither is damage: the first are not needed, the second is a part the saved model never had
    (rankwise never uses a pooler). Both are recognised by building the declared class on the meta device
    (no memory, no time) and keeping only the differences that are real under it too."""
    import torch
    import transformers

    config = getattr(model, "config", None)
    declared = [a for a in (getattr(config, "architectures", None) or []) if a != type(model).__name__]
    cls = getattr(transformers, declared[0], None) if declared else None
    if cls is None or not (info.get("missing_keys") or info.get("unexpected_keys")):
        return dict(info)
    try:
        with torch.device("meta"):
            keys = set(cls(config).state_dict())
    except Exception:  # a class that cannot be built from this config: judge by the loaded class alone
        return dict(info)
    prefix = getattr(model, "base_model_prefix", "")
    out = dict(info)
    out["missing_keys"] = {k for k in info.get("missing_keys") or () if k in keys or f"{prefix}.{k}" in keys}
    out["unexpected_keys"] = {k for k in info.get("unexpected_keys") or () if k not in keys}
    return out


# --- cache entries: recorded at creation, verified at use ------------------------------------------------
def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_files(folder: Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Size, modification time and SHA-256 of every file in ``folder`` (not recursive)."""
    skip = set(exclude)
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in skip:
            st = path.stat()
            out[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(path)}
    return out


def verify_files(folder: Path, files: Mapping[str, Any]) -> str | None:
    """None if every recorded file is there with its size and hash; else what is wrong, in a few words."""
    if not isinstance(files, Mapping) or not files:
        return "no record of its files"
    for name, rec in sorted(files.items()):
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            return f"{name} is missing"
        if not isinstance(rec, Mapping) or st.st_size != rec.get("size"):
            return f"{name} is {st.st_size} bytes, {rec.get('size') if isinstance(rec, Mapping) else '?'} recorded"
        if st.st_mtime_ns != rec.get("mtime_ns") and file_digest(path) != rec.get("sha256"):
            return f"{name} differs from the recorded SHA-256"
    return None


def check_safetensors_structure(path: Path) -> str | None:
    """None if a .safetensors file's header parses and its size is what the header says; else the reason
    (catches truncation in entries written before sizes and hashes were recorded)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{path.name} has an unreadable header"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    return None if size == expected else f"{path.name} is {size} bytes, its header says {expected}"

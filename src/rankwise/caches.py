"""What rankwise keeps in its cache folder, how much room it takes, and clearing it.

Everything under :func:`~rankwise.settings.cache_dir` is derived data that rankwise can rebuild: converted
GGUF models, calibration statistics, kernel timings, benchmark results. A design-space study keeps adding
calibration statistics (one file per model × data × settings), so users need to see and reclaim the space
without guessing which folder is safe to delete. Only the known kinds below are ever touched, and inside
them only entries named the way rankwise names them (:data:`WRITTEN`): a file a user put in the cache
folder survives ``--clear all``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rankwise.errors import RankwiseError
from rankwise.fileio import JsonRecord
from rankwise.settings import cache_dir

#: Cache kinds (sub-folders of the cache folder) and what they hold.
KINDS: dict[str, str] = {
    "gguf": "GGUF models dequantized once to safetensors (rebuilt on the next load, ~25 s for SmolLM2)",
    "calibration": "calibration statistics of the data-aware methods, per model, data and settings",
    "execution": "per-device micro-benchmarks of factorized shapes and layouts (rankwise bench, choose_execution)",
    "bench": "benchmark results written without an explicit --json path",
    "sensitivity": "per-layer sensitivity profiles of the rank allocators, per model and settings",
}

#: The names rankwise gives its entries in each kind's folder (see the modules that write them); temp
#: files of interrupted atomic writes (``.NAME.<pid>-XXXX.tmp``) and unfinished GGUF conversions
#: (``.convert-XXXX``) of those entries count as rankwise's too.
WRITTEN: dict[str, re.Pattern[str]] = {
    "gguf": re.compile(r"[0-9a-f]{32}|\.convert-.+|\.bad-.+"),
    "calibration": re.compile(r"[0-9a-f]{40}\.safetensors"),
    "execution": re.compile(r"[a-z]+-[\w.-]*-t\d+\.json"),
    "bench": re.compile(r"[\w.-]+-\d{8}-\d{6}\.json"),
    "sensitivity": re.compile(r"[0-9a-f]{40}\.json"),
}
_ATOMIC_TEMP = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")


def written_by_rankwise(kind: str, name: str) -> bool:
    """Whether an entry called ``name`` in ``kind``'s folder is one rankwise writes (or its temp file)."""
    pattern = WRITTEN[kind]
    if pattern.fullmatch(name):
        return True
    temp = _ATOMIC_TEMP.fullmatch(name)
    return temp is not None and pattern.fullmatch(temp.group("name")) is not None


@dataclass(frozen=True)
class CacheUsage(JsonRecord):
    """One kind of cached data: where it is, how many files, how many bytes."""

    kind: str
    path: str
    files: int
    bytes: int
    description: str


def _usage(path: Path) -> tuple[int, int]:
    files = size = 0
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                files += 1
                size += p.stat().st_size
    return files, size


def usage() -> list[CacheUsage]:
    """Files and bytes of every known cache kind (absent kinds report zero)."""
    root = cache_dir()
    out = []
    for kind, description in KINDS.items():
        files, size = _usage(root / kind)
        out.append(CacheUsage(kind, str(root / kind), files, size, description))
    return out


def _check_kinds(kinds: list[str], text: str) -> list[str]:
    """``kinds`` when non-empty and all known; else a one-line error naming the first bad one."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise RankwiseError(f"unknown cache kind '{unknown[0] if unknown else text}' "
                            f"(known: {', '.join(KINDS)}, or all)")
    return kinds


def parse_kinds(text: str) -> list[str]:
    """``all`` or a comma-separated list of known kinds; anything else is a one-line error."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    return list(KINDS) if kinds == ["all"] else _check_kinds(kinds, text)


def clear(kinds: list[str]) -> int:
    """Delete what rankwise wrote in the named kinds' folders; returns the bytes freed."""
    return clear_report(kinds)[0]


def clear_report(kinds: list[str]) -> tuple[int, list[Path]]:
    """Delete what rankwise wrote in the named kinds' folders: (bytes freed, entries kept because rankwise
    did not write them). A kind's folder is removed once empty; links are removed, never followed."""
    root = cache_dir()
    freed = 0
    kept: list[Path] = []
    for kind in _check_kinds(list(kinds), ",".join(kinds)):
        path = root / kind
        if path.is_symlink():  # never follow a link out of the cache folder
            path.unlink()
            continue
        if not path.is_dir():
            continue
        for entry in sorted(path.iterdir()):
            if not written_by_rankwise(kind, entry.name):
                kept.append(entry)
            elif entry.is_dir() and not entry.is_symlink():
                freed += _usage(entry)[1]
                shutil.rmtree(entry, ignore_errors=True)
            else:
                freed += 0 if entry.is_symlink() else entry.stat().st_size
                entry.unlink(missing_ok=True)
        if not any(path.iterdir()):
            path.rmdir()
    return freed, kept

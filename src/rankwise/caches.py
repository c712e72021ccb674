"""What rankwise keeps in its cache folder, how much room it takes, and clearing it.

Everything under :func:`~rankwise.settings.cache_dir` is derived data that rankwise can rebuild: converted
GGUF models, calibration statistics, kernel timings, benchmark results. A design-space study keeps adding
calibration statistics (one file per model × data × settings), so users need to see and reclaim the space
without guessing which folder is safe to delete. Only the known kinds below are ever touched.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from rankwise.errors import RankwiseError
from rankwise.settings import cache_dir

#: Cache kinds (sub-folders of the cache folder) and what they hold.
KINDS: dict[str, str] = {
    "gguf": "GGUF models dequantized once to safetensors (rebuilt on the next load, ~25 s for SmolLM2)",
    "calibration": "calibration statistics of the data-aware methods, per model, data and settings",
    "execution": "per-device micro-benchmarks of factorized shapes and layouts (rankwise bench, choose_execution)",
    "bench": "benchmark results written without an explicit --json path",
}


@dataclass(frozen=True)
class CacheUsage:
    """One kind of cached data: where it is, how many files, how many bytes."""

    kind: str
    path: str
    files: int
    bytes: int
    description: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
    """Delete the named kinds' folders; returns the bytes freed."""
    root = cache_dir()
    freed = 0
    for kind in _check_kinds(list(kinds), ",".join(kinds)):
        path = root / kind
        if path.is_symlink():  # never follow a link out of the cache folder
            path.unlink()
            continue
        if path.is_dir():
            freed += _usage(path)[1]
            shutil.rmtree(path)
    return freed

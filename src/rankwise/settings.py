"""Where rankwise keeps things: the cache folder and the benchmark data folder.

Both are settings (environment variables) rather than constants, so CI, users and tests can point them
elsewhere without code changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from rankwise.errors import DataError, RankwiseError, first_line

CACHE_ENV = "RANKWISE_CACHE"
DATA_ENV = "RANKWISE_DATA"


class CacheError(RankwiseError):
    """The cache folder cannot be used (not a folder, not writable)."""


def cache_dir() -> Path:
    """The user cache folder (``$RANKWISE_CACHE``, default ``~/.cache/rankwise``); created on demand.

    A cache that cannot be used (the variable names a file, a read-only filesystem, no permission) is a
    one-line :class:`~rankwise.errors.CacheError` naming the setting, raised before the work that would
    fill the cache. rankwise does not silently fall back to another folder: a cache in a surprising place
    would fill a disk the user did not choose, and lose its entries on the next boot."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "rankwise"
    setting = f"{CACHE_ENV}={root}" if root else f"the cache folder {path} (set {CACHE_ENV} to move it)"
    fix = f"point {CACHE_ENV} at a writable folder"
    if path.exists() and not path.is_dir():
        raise CacheError(f"{setting} is a file, not a folder: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"{setting}: cannot create it ({exc.strerror or first_line(exc)}): {fix}") from None
    reason = _cache_probe(path)
    if reason is not None:
        raise CacheError(f"{setting}: cannot write in it ({reason}): {fix}")
    return path


_WRITABLE: set[Path] = set()


def _cache_probe(path: Path) -> str | None:
    """Whether a file can be created in the cache folder, tried once per process and folder."""
    if path in _WRITABLE:
        return None
    from rankwise.fileio import probe_writable

    reason = probe_writable(path)
    if reason is None:
        _WRITABLE.add(path)
    return reason


def data_dir(override: str | os.PathLike[str] | None = None) -> Path | None:
    """The benchmark data folder: an explicit ``--data-dir``, else ``$RANKWISE_DATA``, else None."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(DATA_ENV)
    if not env:
        return None
    path = Path(env).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"{DATA_ENV}={env} is a file, not a folder (point it at the benchmark data folder)")
    return path


def check_data_dir(path: str | os.PathLike[str] | None, option: str = "--data-dir") -> Path | None:
    """``path`` if it is an existing folder (None passes through); else a one-line DataError that says
    which it is: missing, or a file where a folder is wanted."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise DataError(f"{option} {folder} is a file, not a folder (give the benchmark data folder)")
    raise DataError(f"{option} {folder} does not exist (give the benchmark data folder, or set {DATA_ENV})")


def installed_version() -> str:
    """rankwise's installed version, from its package metadata (usable from every layer, unlike the package
    root's ``__version__``); "unknown" when run from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rankwise")
    except PackageNotFoundError:
        return "unknown"

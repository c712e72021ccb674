"""Where rankwise keeps things: the cache folder and the benchmark data folder.

Both are settings (environment variables) rather than constants, so CI, users and tests can point them
elsewhere without code changes.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RANKWISE_CACHE"
DATA_ENV = "RANKWISE_DATA"


def cache_dir() -> Path:
    """The user cache folder (``$RANKWISE_CACHE``, default ``~/.cache/rankwise``); created on demand."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "rankwise"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(override: str | os.PathLike[str] | None = None) -> Path | None:
    """The benchmark data folder: an explicit ``--data-dir``, else ``$RANKWISE_DATA``, else None."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else None

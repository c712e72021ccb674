"""Writing files so that a reader never sees half of one: temp name in the same folder, then rename.

Every output rankwise writes (results JSON, reports, calibration caches, timing caches) goes through
:func:`atomic_path`: a crash or Ctrl-C leaves either the old file or the new one, never a truncated one.
``tempfile`` creates private (0600) files; the result gets the permissions a plain ``open(path, "w")``
would have given it (0666 minus the umask), so results are readable by the user's other tools.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """0666 minus the umask: what ``open(path, "w")`` would create."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """0777 minus the umask: what ``mkdir`` would create."""
    return 0o777 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(obj: Any) -> Any:
    """Strict-JSON-safe copy: NaN and ±inf become null (JSON has no NaN; readers choke on it)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented strict JSON (non-finite floats as null; other objects via ``str``)."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n")

"""Writing files so that a reader never sees half of one: temp name in the same folder, then rename.

Every output rankwise writes (results JSON, reports, calibration caches, timing caches) goes through
:func:`atomic_path`: a crash or Ctrl-C leaves either the old file or the new one, never a truncated one.
``tempfile`` creates private (0600) files; the result gets the permissions a plain ``open(path, "w")``
would have given it (0666 minus the umask), so results are readable by the user's other tools.

Temp names carry the writer's process id (``.NAME.<pid>-XXXX.tmp``), so a temp file left by a killed
process is recognised and removed by the next write of the same file. :func:`check_output_path` checks an
output path before the work that fills it starts, and :func:`write_or_rescue` saves finished results to a
rescue folder (and says where) when the requested path fails at the end anyway.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from rankwise.errors import OutputError, first_line


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


@functools.cache
def libc() -> Any:
    """The C library (``errno`` kept for ``ctypes.get_errno``), looked up once: ``find_library`` starts
    ``ldconfig``. For what ``os`` lacks: ``renameat2`` (an atomic folder swap) and glibc's allocator controls.
    None where there is no C library to load; callers treat a missing function as "not available"."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except (OSError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine); ours counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def remove_stale(folder: Path, prefix: str, suffix: str = "", legacy_stale: bool = False) -> list[Path]:
    """Remove the entries ``<prefix><pid>-XXXX<suffix>`` in ``folder`` whose writer process is dead.

    Entries without a process id (written by an older rankwise) are removed only when ``legacy_stale``
    (the caller holds a lock proving no one else writes them). Returns what was removed; errors are ignored
    (another process may be removing the same leftovers)."""
    removed = []
    try:
        entries = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:
        return removed
    for entry in entries:
        middle = entry.name[len(prefix):len(entry.name) - len(suffix)]
        match = re.match(r"(\d+)-", middle)
        if match is not None:
            if pid_alive(int(match.group(1))):
                continue
        elif not legacy_stale or re.fullmatch(r"[a-z0-9_]{8}", middle) is None:  # tempfile's 8 random chars
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    Temp files of the same ``path`` left by killed processes are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.", suffix)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=suffix, dir=path.parent)
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


class JsonRecord:
    """Mixin for a dataclass whose fields are JSON values: :meth:`to_dict` is what reports and caches write."""

    def to_dict(self) -> dict[str, Any]:
        """The fields by name (nested dataclasses as dicts), tuples as the lists JSON has."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented strict JSON (non-finite floats as null; other objects via ``str``)."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, default=str, allow_nan=False) + "\n")


# --- output paths: checked before the work, and never losing finished work --------------------------------
def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor."""
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    return probe


def probe_writable(folder: Path) -> str | None:
    """None if a file can be created in ``folder`` (tried for real: permissions, read-only filesystems and
    pseudo-filesystems like /proc all answer differently to ``os.access``); else the reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".rankwise-probe.{os.getpid()}-", dir=folder)
    except OSError as exc:
        return exc.strerror or first_line(exc)
    os.close(fd)
    with suppress(OSError):
        os.unlink(name)
    return None


def check_output_path(path: str | os.PathLike[str], kind: Literal["file", "folder"] = "file",
                      option: str = "output") -> Path:
    """Check, before any work, that ``path`` can later be written as a ``kind``; a one-line
    :class:`~rankwise.errors.OutputError` naming ``option`` otherwise.

    A file wanted where a folder is (or the reverse), a parent path that runs through a file, a parent that
    cannot be written, and (for folders) the current folder or one of its ancestors are all refused: each
    would fail only after the work, or (``--out .``) replace the folder the user is working in. Missing
    parent folders are fine (they are created when writing); returns the path, ``~`` expanded."""
    path = Path(path).expanduser()
    where = f"{option} {path}"
    if kind == "file" and path.is_dir():
        raise OutputError(f"{where} is a folder; give a file path")
    if kind == "folder":
        if path.exists() and not path.is_dir():
            raise OutputError(f"{where} is a file, not a folder")
        resolved, cwd = path.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise OutputError(f"{where} is the current folder{'' if resolved == cwd else ' or one above it'}; "
                              f"write into a new sub-folder (e.g. {option} ./out)")
    parent = path.parent if path.parent != path else path
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise OutputError(f"{where}: {existing} is a file, not a folder")
    reason = probe_writable(existing)
    if reason is not None:
        raise OutputError(f"{where}: cannot write in {existing} ({reason})")
    return path


def rescue_folder() -> Path:
    """Where results go when their requested path fails at the end: a per-user folder in the temp folder."""
    folder = Path(tempfile.gettempdir()) / f"rankwise-rescued-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_or_rescue(path: str | os.PathLike[str], write: Callable[[Path], Any], what: str = "results") -> Any:
    """``write(path)``; if that fails with an OS error (disk full, folder removed or made read-only since
    the start), ``write`` into :func:`rescue_folder` instead and raise a one-line OutputError saying where the
    finished ``what`` are. Work that took an hour is never lost to a bad output path."""
    path = Path(path).expanduser()
    try:
        return write(path)
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        if exc.errno == errno.EISDIR:
            reason = "it is a folder"
    fd, name = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=path.suffix, dir=rescue_folder())
    os.close(fd)
    rescued = Path(name)
    try:
        write(rescued)
    except OSError as exc:
        raise OutputError(f"cannot write {what} to {path} ({reason}) nor to {rescued} "
                          f"({exc.strerror or first_line(exc)})") from None
    raise OutputError(f"cannot write {what} to {path} ({reason}); they were saved to {rescued}")

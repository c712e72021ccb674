"""Where a checkpoint is written: checked before the work, locked while written, replaced in one step.

Decomposing takes minutes, so everything that would make the final save fail or do harm is refused up
front (:func:`check_out_folder`): ``--out .`` or a folder above the current one, a file where the folder
should be, an unwritable parent, an existing folder without ``--overwrite``, and with ``--overwrite`` a
folder that rankwise did not write (user files are never deleted to make room for a checkpoint).

:func:`output_lock` makes a second run into the same OUT fail at once with one line, instead of both
running for minutes and one silently replacing the other (``filelock``, an OS-level lock released when the
process ends, however it ends). The lock files live in a per-user folder of the temp folder, keyed by the
absolute path of OUT, so the folder next to OUT stays clean.

The save writes ``.OUT.tmp-<pid>-XXXX/`` and swaps it with OUT in one atomic ``renameat2(RENAME_EXCHANGE)``
where Linux offers it (a kill at any instant leaves either the old OUT or the new one). Where it does not,
the old OUT is first moved to ``.OUT.old-<pid>-XXXX/`` and a run killed between the two renames leaves OUT
missing: the next run into the same OUT (holding the lock) puts the old one back before anything else.
Leftover temp folders of dead processes are removed by the next run (:func:`clean_leftovers`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from rankwise.checkpoint.format import REPORT_FILE, is_checkpoint
from rankwise.errors import OutputError, RankwiseError, first_line
from rankwise.fileio import check_output_path, dir_mode, file_mode, libc, pid_alive, remove_stale


class CheckpointError(OutputError):
    """A checkpoint that cannot be written where asked (exists, not a folder, not a transformers model)."""


#: Per-process count of the locks this process holds, by absolute OUT path: saving inside a command that
#: already locked OUT must not wait for itself.
_HELD: dict[str, int] = {}


def tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def old_prefix(out: Path) -> str:
    return f".{out.name}.old-"


def _key(out: Path) -> str:
    return str(out.expanduser().absolute().resolve())


def _lock_paths(out: Path) -> tuple[Path, Path]:
    key = _key(out)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"rankwise-locks-{uid}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest}.lock", folder / f"{digest}.pid"


@contextmanager
def output_lock(out: str | os.PathLike[str], option: str = "--out") -> Iterator[None]:
    """Hold the lock on ``out`` for the duration; another process holding it is a one-line OutputError."""
    from filelock import FileLock, Timeout

    out = Path(out).expanduser()
    key = _key(out)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock_file, pid_file = _lock_paths(out)
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = f" (pid {int(pid_file.read_text().strip())})"
        except (OSError, ValueError):
            owner = ""
        raise OutputError(f"{option} {out} is being written by another rankwise run{owner}; wait for it to "
                          f"finish or choose another {option}") from None
    _HELD[key] = 1
    try:
        with suppress(OSError):  # the pid only improves the message
            pid_file.write_text(f"{os.getpid()}\n")
        yield
    finally:
        _HELD.pop(key, None)
        lock.release()


def written_by_rankwise(folder: Path) -> bool:
    """A folder rankwise wrote: a rankwise checkpoint (its config.json says so) or one with its report."""
    return is_checkpoint(folder) or (folder / REPORT_FILE).is_file()


def check_out_folder(out: str | os.PathLike[str], overwrite: bool, option: str = "--out") -> Path:
    """Everything about OUT that can be checked before the work (see the module docstring); returns it.

    Holding :func:`output_lock`, it first cleans what killed runs left (:func:`clean_leftovers`)."""
    try:
        out = check_output_path(out, "folder", option)
    except OutputError as exc:
        raise CheckpointError(str(exc)) from None
    if _HELD.get(_key(out)):  # leftovers of killed runs first: a moved-aside old OUT is put back before the check
        clean_leftovers(out)
    if not out.exists() or not any(out.iterdir()):  # an empty folder holds nothing to lose
        return out
    if not overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    if not written_by_rankwise(out):
        raise CheckpointError(f"{out} is not a folder rankwise wrote (no rankwise config.json or {REPORT_FILE}): "
                              f"--overwrite only replaces rankwise checkpoints; move it away or choose another "
                              f"{option}")
    return out


def clean_leftovers(out: Path) -> list[Path]:
    """Restore an old OUT a killed run had moved aside, then remove temp folders of dead processes.

    Call it holding :func:`output_lock` (then folders without a process id in their name, written by an
    older rankwise, are known to be stale too). Returns the removed paths."""
    parent = out.parent
    if not out.exists():  # a run killed between moving the old OUT aside and moving the new one in
        for aside in sorted(parent.glob(f"{old_prefix(out)}*/{out.name}")):
            pid = aside.parent.name[len(old_prefix(out)):].split("-", 1)[0]
            if not (pid.isdigit() and pid_alive(int(pid))):
                os.replace(aside, out)
                break
    removed = remove_stale(parent, tmp_prefix(out), legacy_stale=True)
    return removed + remove_stale(parent, old_prefix(out), legacy_stale=True)


def make_temp_folder(out: Path) -> Path:
    """A private temp folder next to ``out`` whose name carries this process's id."""
    return Path(tempfile.mkdtemp(prefix=f"{tmp_prefix(out)}{os.getpid()}-", dir=out.parent))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the OS or filesystem cannot."""
    try:
        renameat2 = libc().renameat2
    except AttributeError:  # no C library, or one without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is swapped out atomically and removed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old OUT
        return
    trash = Path(tempfile.mkdtemp(prefix=f"{old_prefix(out)}{os.getpid()}-", dir=out.parent))
    os.replace(out, trash / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash / out.name, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def normal_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give what was written the permissions a plain mkdir would."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(dir_mode() if path.is_dir() else file_mode())


@contextmanager
def atomic_folder(out: Path, error: type[RankwiseError] = CheckpointError) -> Iterator[Path]:
    """A temp folder beside ``out`` to write into; when the block finishes it gets normal permissions and
    replaces ``out`` in one step (:func:`replace_folder`), and on any failure it is removed, so ``out`` is
    either the old folder or the complete new one. Checkpoints, streamed checkpoints and reports use it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_folder(out)
    except OSError as exc:
        raise error(f"cannot write {out}: {first_line(exc)}") from None
    try:
        yield tmp
        normal_permissions(tmp)
        replace_folder(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"cannot write {out}: {first_line(exc)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

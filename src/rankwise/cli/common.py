"""What every command shares around its run: resources held until it ends, and what Ctrl-C leaves behind.

A command takes locks (an output folder) that must be released when it ends, however it ends, without
wrapping its whole body in ``with`` blocks: :func:`hold` enters a context manager into the scope that
:func:`command_scope` (used by :func:`rankwise.cli.main.run`) closes after the command. A command also says,
as it goes, what an interrupt would leave (:func:`on_interrupt`), so Ctrl-C ends with one line saying what
was kept instead of a bare exit code.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rankwise.fileio import check_output_path

T = TypeVar("T")

_scopes: list[ExitStack] = []
_notes: list[str] = []
DEFAULT_INTERRUPT_NOTE = "nothing was written"


@contextmanager
def command_scope() -> Iterator[None]:
    """The lifetime of one command: what :func:`hold` entered is released at its end."""
    with ExitStack() as stack:
        _scopes.append(stack)
        _notes.append(DEFAULT_INTERRUPT_NOTE)
        try:
            yield
        finally:
            _scopes.pop()
            _notes.pop()


def hold(manager: AbstractContextManager[T]) -> T:
    """Enter ``manager`` until the command ends (at exit when a command runs outside :func:`command_scope`,
    e.g. under typer's test runner)."""
    if _scopes:
        return _scopes[-1].enter_context(manager)
    stack = ExitStack()
    atexit.register(stack.close)
    return stack.enter_context(manager)


def on_interrupt(note: str) -> None:
    """What an interrupt at this point leaves behind (replaces the previous note of this command)."""
    if _notes:
        _notes[-1] = note


def interrupt_note() -> str:
    return _notes[-1] if _notes else DEFAULT_INTERRUPT_NOTE


def check_output_file(path: Path | None, option: str) -> Path | None:
    """``--json PATH`` and friends, checked before any work (None passes through)."""
    return None if path is None else check_output_path(path, "file", option)


def write_note(paths: dict[str, Any]) -> str:
    """'nothing was written to A or B' for the outputs a command had not written yet."""
    named = [str(p) for p in paths.values() if p is not None]
    return f"nothing was written{' to ' + ' or '.join(named) if named else ''}"

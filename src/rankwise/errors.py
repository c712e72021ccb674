"""User-facing errors.

Every problem a user can cause (a bad model name, a malformed plan, a missing data file) is raised as a
:class:`RankwiseError` with a one-line message naming the problem. The CLI turns these into
``error: <message>`` on stderr and exit code 2, never a traceback; the Python API lets them propagate.
"""

from __future__ import annotations


class RankwiseError(Exception):
    """An error caused by input the user can fix; its message is one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ModelLoadError(RankwiseError):
    """A model spec that names nothing loadable, or a file that is not a valid model."""


class PlanError(RankwiseError):
    """A decomposition plan that is malformed or does not fit the model."""


class DataError(RankwiseError):
    """A benchmark or calibration file that is missing or malformed."""


class DecompositionError(RankwiseError):
    """A weight that cannot be decomposed as asked (NaN/Inf, impossible rank)."""


class OutputError(RankwiseError):
    """An output path that cannot be written (a folder where a file is wanted, an unwritable parent, a folder
    rankwise did not write, another run writing it); reported before the work starts."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in one line.

    A first line that ends with a colon only announces what follows ("Validation error for field 'x':"), so
    the following lines are joined to it until one completes the sentence; the line itself never ends with
    a colon."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0]
    for line in lines[1:]:
        if not out.endswith(":"):
            break
        out = f"{out} {line}"
    return out.rstrip(":")

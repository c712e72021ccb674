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


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for wrapping library errors in one line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()

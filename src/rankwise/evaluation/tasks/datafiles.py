"""Reading benchmark files with one-line errors that name the file and line.

The benchmark files come from their authors in several formats (JSONL, JSON, CSV, TSV, bz2 text); a
malformed file must surface as a :class:`~rankwise.errors.DataError` naming the path, not a traceback.
"""

from __future__ import annotations

import bz2
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rankwise.errors import DataError, first_line


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-empty line of a JSONL file as a dict."""
    rows: list[dict[str, Any]] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({first_line(exc)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(row)
    return rows


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable JSON ({first_line(exc)})") from None


def read_csv(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header line, as dicts keyed by the header."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable {'TSV' if delimiter == chr(9) else 'CSV'} ({first_line(exc)})") from None


def read_lines(path: Path) -> list[str]:
    """Lines of a text file (``.bz2`` decompressed on the fly), without line endings."""
    return [line for _, line in _lines(path)]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\n").rstrip("\r")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({first_line(exc)})") from None


def require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """A one-line error if a record lacks a field the task needs."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")

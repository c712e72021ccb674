"""Where a report's study document comes from: an exported results JSON file or an Optuna storage URL.

Reading a storage needs :mod:`rankwise.studies` (and Optuna); it is imported only for that case, so a
report from a JSON file works in an install without them, and a missing module is a one-line error that
says how to get the JSON instead.
"""

from __future__ import annotations

from typing import Any

from rankwise.errors import RankwiseError, first_line
from rankwise.reports.document import ReportInputError, check_document, load_document


def is_storage_url(source: str) -> bool:
    return "://" in source and source.split("://", 1)[0].replace("+", "").isalnum()


def load_source(source: str, study: str | None = None) -> dict[str, Any]:
    """The checked ``rankwise.study/1`` document for a results file or a storage URL (+ study name)."""
    if not is_storage_url(source):
        doc = load_document(source)
        if study is not None and doc.get("study") not in (None, study):
            raise ReportInputError(f"{source} holds study {doc.get('study')!r}, not {study!r}")
        return doc
    try:
        from rankwise.studies.export import study_document
    except ImportError as exc:
        raise RankwiseError(
            f"reading the study storage {source} needs rankwise.studies ({first_line(exc)}); "
            "pass an exported results JSON file instead (`rankwise study export --json FILE`)") from None
    try:
        doc = study_document(source, study)
    except RankwiseError:
        raise
    except Exception as exc:  # storage drivers raise their own types (sqlalchemy, optuna, psycopg)
        raise RankwiseError(f"cannot read study {study or '(the only one)'} from {source}: {first_line(exc)}") from None
    return check_document(doc, source)

"""Moved to :mod:`rankwise.evaluation.tasks.datafiles` (reading benchmark files lives with the tasks); this
module re-exports it for code written against the first release."""

from rankwise.evaluation.tasks.datafiles import read_csv, read_json, read_jsonl, read_lines, require

__all__ = ["read_csv", "read_json", "read_jsonl", "read_lines", "require"]

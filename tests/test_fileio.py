"""Atomic writes: nothing half-written, normal permissions, strict JSON."""

from __future__ import annotations

import json
import stat

import pytest

from rankwise.fileio import atomic_path, file_mode, write_json_atomic


def test_json_is_strict_and_readable_by_others(tmp_path):
    out = tmp_path / "sub" / "r.json"
    write_json_atomic(out, {"ppl": float("nan"), "x": [1.5, float("inf")], "p": tmp_path})
    assert json.loads(out.read_text()) == {"ppl": None, "x": [1.5, None], "p": str(tmp_path)}
    assert stat.S_IMODE(out.stat().st_mode) == file_mode()  # not mkstemp's private 0600
    assert list(out.parent.iterdir()) == [out]  # no temp file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "old"
    assert list(tmp_path.iterdir()) == [out]

"""``rankwise cache``: usage per kind, clearing only what was named, one-line errors."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from rankwise import caches


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / f"{'a' * 40}.safetensors").write_bytes(b"x" * 1000)  # named as rankwise names it
    (tmp_path / "execution").mkdir()
    (tmp_path / "execution" / "cpu-x86_64-float32-t2.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("not rankwise's")  # never touched: not a known kind
    return tmp_path


def test_usage_and_clear_one_kind(cache_root, capsys):
    by_kind = {u.kind: u for u in caches.usage()}
    assert (by_kind["calibration"].files, by_kind["calibration"].bytes) == (1, 1000)
    assert by_kind["gguf"].files == 0 and set(by_kind) == set(caches.KINDS)
    code, out, _ = run_cli(["cache", "--clear", "calibration", "--json"], capsys)
    assert code in (0, None)
    doc = json.loads(out)
    assert {k["kind"]: k["files"] for k in doc["kinds"]} == {"gguf": 0, "calibration": 0, "execution": 1, "bench": 0,
                                                             "sensitivity": 0}
    assert not (cache_root / "calibration").exists() and (cache_root / "execution" / "cpu-x86_64-float32-t2.json").exists()
    assert (cache_root / "mine.txt").exists()


def test_clear_all_and_unknown_kind(cache_root, capsys):
    assert caches.clear(caches.parse_kinds("all")) == 1002
    assert (cache_root / "mine.txt").exists() and not (cache_root / "execution").exists()
    code, _, err = run_cli(["cache", "--clear", "calibration,weights"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "unknown cache kind 'weights'" in err

"""Shared fixtures: the real bundled models (loaded once per session) and the real data directory."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy 2-core machines: spinning OpenMP threads starve each other

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RANKWISE_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


#: Fixtures that load a real bundled model: a test using one (directly or through another fixture) is slow.
REAL_MODEL_FIXTURES = frozenset({"smollm", "minilm"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast lane (``-m "not slow"``) is defined by what a test needs, not by hand-kept lists: every test
    that depends on a real-model fixture is marked ``slow`` here; tests that run lm-eval or start a
    subprocess carry the mark themselves."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["RANKWISE_DATA"])
    assert path.is_dir(), f"benchmark data not found at {path} (set RANKWISE_DATA)"
    return path


@pytest.fixture(scope="session")
def smollm():
    """The default model (SmolLM2-135M-Instruct), loaded once. Do not modify it in place: deep-copy it."""
    from rankwise.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from rankwise.models import load

    return load("minilm-l6")

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
#: Under pytest-xdist (``make test`` runs one worker per core) the cores are shared among the workers, so each
#: worker's torch takes its share; oversubscribed OpenMP threads would slow every worker down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


#: Fixtures that load a real bundled model: a test using one (directly or through another fixture) is slow.
REAL_MODEL_FIXTURES = frozenset({"smollm", "minilm"})


#: The two files that take longest (the lm-eval parity runs, a whole paper run) are collected first, so the
#: two pytest-xdist workers (whole files each) start one each at once. Only these two: xdist hands out its
#: first files round-robin, so listing more heavy files here would stack them on one worker up front; the
#: others are pulled by whichever worker is free. Only the order changes; tests within a file keep theirs.
HEAVY_FIRST = ("test_eval_parity.py", "test_paper.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast lane (``-m "not slow"``) is defined by what a test needs, not by hand-kept lists: every test
    that depends on a real-model fixture is marked ``slow`` here; tests that run lm-eval or start a
    subprocess carry the mark themselves."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


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

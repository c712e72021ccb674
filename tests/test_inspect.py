"""`rankwise inspect --json` on both bundled models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rankwise.analysis import inspect_model, singular_values


def _inspect(model: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rankwise", "inspect", model, "--json"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


@pytest.mark.slow  # a subprocess loading a real model
def test_inspect_smollm_json():
    report = _inspect("smollm2-135m")
    assert set(report) >= {"model", "architecture", "n_params", "targets", "design_space"}
    assert report["n_params"] == 134_515_008 and report["architecture"] == "llama"
    targets = report["targets"]
    assert len(targets) == 210
    shapes = {t["role"]: tuple(t["shape"]) for t in targets}
    assert shapes == {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                      "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
    for t in targets:
        assert set(t) >= {"layer", "role", "shape", "params", "break_even_rank", "energy_rank_90",
                          "energy_rank_99", "stable_rank"}
        m, n = t["shape"]
        assert t["params"] == m * n and abs(t["break_even_rank"] - m * n / (m + n)) < 1e-9
        assert 1 <= t["energy_rank_90"] <= t["energy_rank_99"] <= min(m, n)
        assert 1.0 <= t["stable_rank"] <= min(m, n)
    assert report["design_space"]["paper_log2"] == 30 + 7
    assert report["design_space"]["per_target_log2"] > 1000


@pytest.mark.slow  # a subprocess loading a real model
def test_inspect_minilm_json():
    report = _inspect("minilm-l6")
    assert len(report["targets"]) == 36 and report["architecture"] == "bert"
    assert report["design_space"]["paper_log2"] == 6 + 6


def test_spectrum_matches_svd(smollm):
    """The fast Gram-eigenvalue spectrum equals torch's SVD on a real weight."""
    w = smollm.model.model.layers[3].mlp.down_proj.weight.detach()
    s_ref = torch.linalg.svdvals(w.double())
    s = singular_values(w)
    assert torch.allclose(s[:100], s_ref[:100], rtol=1e-6)
    report = inspect_model(smollm.model, smollm.info)
    row = next(t for t in report["targets"] if t["layer"] == 3 and t["role"] == "down")
    energy = (s_ref**2).cumsum(0) / (s_ref**2).sum()
    assert row["energy_rank_90"] == int((energy < 0.9).sum()) + 1
    assert abs(row["stable_rank"] - float((s_ref**2).sum() / s_ref[0] ** 2)) < 1e-6 * row["stable_rank"]

"""Decomposition methods and solvers on real SmolLM2 weights, activations and gradients.

Each check is a property that fails if the method is wrong: plain SVD and Tucker must hit the
Eckart–Young optimum; Tucker must agree with TensorLy's HOOI; each data-aware method must reach the
optimum of *its own* weighted objective (and so beat plain SVD there) while differing from plain SVD.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from rankwise.decomposition import (
    CalibrationStats,
    DecompositionMethod,
    MethodResult,
    available_methods,
    get_method,
    register_method,
    relative_error,
    solvers,
    weighted_error,
)
from rankwise.decomposition import base as base_mod
from rankwise.errors import DecompositionError, PlanError

LAYER = 3
ROLES = ("q", "k", "down")  # 576×576, 192×576, 576×1536


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """LAPACK/eigh calls run single-threaded here: on 2 shared cores, OpenMP oversubscription made them
    10-50x slower (measured); restored for the other test modules afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Captured(Exception):
    """Raised by the capture hook once the last needed input is seen: the rest of the model is not run."""


# --- fixtures: real weights, activations and gradients --------------------------------------------------
@pytest.fixture(scope="module")
def weights(smollm) -> dict[str, torch.Tensor]:
    from rankwise.models import adapter_for

    adapter = adapter_for(smollm.model)
    return {role: adapter.linear(LAYER, role).weight.detach().float().clone() for role in ROLES}


def _wikitext_ids(tokenizer, data_dir: Path, n_tokens: int, offset: int = 0) -> torch.Tensor:
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[offset: offset + 40 * n_tokens]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= n_tokens, "not enough WikiText-2 text"
    return ids[:n_tokens]


@pytest.fixture(scope="module")
def activations(smollm, data_dir) -> dict[str, torch.Tensor]:
    """Inputs (tokens × n) of layer 3's q_proj and down_proj on 2048 real WikiText-2 tokens."""
    from rankwise.models import adapter_for

    model, tokenizer = smollm.model, smollm.tokenizer
    adapter = adapter_for(model)
    ids = _wikitext_ids(tokenizer, data_dir, 2048).reshape(4, 512)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for role in ("q", "down"):
        def hook(_module, inputs, _output, role=role):
            captured[role] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if role == "down":  # layer 3's last Linear: layers 4-29 and the LM head are not needed
                raise _Captured
        handles.append(adapter.linear(LAYER, role).register_forward_hook(hook))
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _gram(X: torch.Tensor) -> torch.Tensor:
    X = X.to(torch.float64)
    return X.T @ X


@pytest.fixture(scope="module")
def fisher(smollm, data_dir) -> dict[str, torch.Tensor]:
    """Squared gradients of the LM loss w.r.t. layer 3's q_proj and down_proj, one backward pass."""
    from rankwise.models import adapter_for

    model, tokenizer = smollm.model, smollm.tokenizer
    adapter = adapter_for(model)
    ids = _wikitext_ids(tokenizer, data_dir, 256, offset=20000)[None]
    params = {role: adapter.linear(LAYER, role).weight for role in ("q", "down")}
    loss = model(input_ids=ids, labels=ids).loss
    # autograd.grad leaves the shared model's .grad untouched (the fixture model must not change).
    grads = torch.autograd.grad(loss, list(params.values()))
    return {role: (g.detach().float() ** 2) for role, g in zip(params, grads, strict=True)}


def _spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """Reference singular values: LAPACK in float64 (independent of rankwise's Gram-based solvers)."""
    return torch.linalg.svdvals(matrix.to(torch.float64))


def _optimal(s: torch.Tensor, rank: int) -> float:
    """Eckart–Young optimum, relative: sqrt(Σ_{i>r} s_i²) / ‖M‖ from the spectrum s of M."""
    return float(torch.sqrt((s[rank:] ** 2).sum()) / torch.sqrt((s**2).sum()))


# --- registry and errors ----------------------------------------------------------------------------------
def test_registry_lists_all_methods_and_rejects_unknown():
    assert {"tucker", "svd", "asvd", "svd-llm", "fwsvd"} <= set(available_methods())
    assert get_method("svd-llm").needs == frozenset({"gram"})
    assert get_method("tucker").form == "three_factor"
    with pytest.raises(PlanError) as err:
        get_method("cp")
    assert "known:" in str(err.value) and "tucker" in str(err.value) and "\n" not in str(err.value)


def test_adding_a_method_is_one_registered_class():
    @register_method
    class Scaled(DecompositionMethod):
        name = "test-half-svd"

        def decompose(self, weight, rank, stats=None) -> MethodResult:
            result = get_method("svd").decompose(weight, rank)
            result.factors.A = result.factors.A * 0.5
            return result

        def singular_values(self, weight, stats=None):
            return 0.5 * get_method("svd").singular_values(weight)

    try:
        assert "test-half-svd" in available_methods()
        W = torch.randn(20, 30)
        approx = get_method("test-half-svd").decompose(W, 3).factors.reconstruct()
        assert torch.allclose(approx, 0.5 * get_method("svd").decompose(W, 3).factors.reconstruct(), atol=1e-5)
    finally:
        base_mod._REGISTRY.pop("test-half-svd", None)


@pytest.mark.parametrize("method", ["tucker", "svd", "asvd", "svd-llm", "fwsvd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_raises(method, bad):
    W = torch.randn(24, 16)
    W[3, 5] = bad
    stats = CalibrationStats(gram=torch.eye(16, dtype=torch.float64), act_abs_mean=torch.ones(16),
                             fisher=torch.ones(24, 16))
    with pytest.raises(DecompositionError, match="NaN/Inf"):
        get_method(method).decompose(W, 2, stats)


def test_bad_requests_raise_one_line_errors():
    W = torch.randn(24, 16)
    with pytest.raises(DecompositionError, match="needs calibration statistics gram"):
        get_method("svd-llm").decompose(W, 2)
    with pytest.raises(DecompositionError, match=r"outside 1\.\.min"):
        get_method("svd").decompose(W, 17)
    with pytest.raises(DecompositionError, match="two-factor method takes one rank"):
        get_method("svd").decompose(W, (2, 3))
    with pytest.raises(DecompositionError, match="channels"):
        get_method("asvd").decompose(W, 2, CalibrationStats(act_abs_mean=torch.ones(15)))
    with pytest.raises(DecompositionError, match="fisher information is all zero"):
        get_method("fwsvd").decompose(W, 2, CalibrationStats(fisher=torch.zeros(24, 16)))
    with pytest.raises(DecompositionError, match="no positive diagonal"):
        get_method("svd-llm").decompose(W, 2, CalibrationStats(gram=torch.zeros(16, 16)))


# --- plain SVD and Tucker: Eckart–Young on real weights ----------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_svd_and_tucker_reach_eckart_young_optimum(weights, role, method):
    W = weights[role]
    m, n = W.shape
    s = _spectrum(W)
    for rank in (1, 2, 8, 64, min(m, n) // 2):
        result = get_method(method).decompose(W, rank)
        err = relative_error(W, result.factors.reconstruct())
        opt = _optimal(s, rank)
        assert err == pytest.approx(opt, rel=1e-5), (role, rank, result.solver)
        assert result.factors.ranks == (rank, rank)
        assert result.factors.A.dtype == torch.float32
    if method == "tucker":
        f = get_method("tucker").decompose(W, 16).factors
        eye = torch.eye(16)
        assert torch.allclose(f.A.T @ f.A, eye, atol=1e-4) and torch.allclose(f.B.T @ f.B, eye, atol=1e-4)
        assert f.params == 16 * (m + n) + 16 * 16


@pytest.mark.parametrize("solver", ["krylov", "gram", "lapack"])
def test_every_solver_is_optimal_and_auto_uses_krylov_for_rank_one(weights, solver):
    for role in ("q", "down"):
        W = weights[role]
        s = _spectrum(W)
        for rank in (1, 3, 12):
            res = solvers.truncated_svd(W, rank, solver)
            approx = (res.U * res.s) @ res.V.T
            assert relative_error(W, approx) == pytest.approx(_optimal(s, rank), rel=1e-5), (role, rank, solver)
            assert torch.all(res.s[:-1] >= res.s[1:])
    assert solvers.truncated_svd(weights["q"], 1).solver == "krylov"
    assert solvers.truncated_svd(weights["q"], 100).solver == "gram"


def test_krylov_handles_rank_deficient_and_zero_matrices():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(600, 3, generator=gen) @ torch.randn(3, 640, generator=gen)  # rank 3
    for rank in (1, 2):
        res = solvers.truncated_svd(W, rank, "krylov")
        approx = (res.U * res.s) @ res.V.T
        assert relative_error(W, approx) == pytest.approx(_optimal(_spectrum(W), rank), rel=1e-5)
    zero = get_method("tucker").decompose(torch.zeros(600, 640), 1).factors
    assert torch.count_nonzero(zero.reconstruct()) == 0 and torch.isfinite(zero.A).all()


def test_float32_gram_falls_back_to_float64_near_full_rank(weights):
    W = weights["k"]  # 192×576: at rank 191 the discarded energy is below float32 resolution of the Gram
    assert solvers.truncated_svd(W, 191, "gram").solver == "gram-f64"
    assert solvers.truncated_svd(W, 20, "gram").solver == "gram"


def test_singular_values_match_lapack(weights):
    for role in ROLES:
        W = weights[role]
        ref = torch.linalg.svdvals(W.to(torch.float64))
        got = get_method("tucker").singular_values(W).to(torch.float64)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= 1e-6 * float(ref[0])


# --- Tucker against TensorLy -------------------------------------------------------------------------------
def _tensorly_error(W: torch.Tensor, ranks: tuple[int, int]) -> float:
    import tensorly as tl
    from tensorly.decomposition import tucker

    # pytorch backend: its LAPACK calls follow torch's thread setting (numpy's OpenBLAS keeps its own pool)
    with tl.backend_context("pytorch"):
        core, (A, B) = tucker(W.to(torch.float64), rank=list(ranks), init="svd", n_iter_max=100, tol=1e-4,
                              random_state=0)
    approx = A @ core @ B.T
    return relative_error(W, approx)


@pytest.mark.parametrize("ranks", [(1, 1), (16, 16), (8, 32)])
def test_tucker_matches_tensorly_on_real_weight(weights, ranks):
    W = weights["q"]
    result = get_method("tucker").decompose(W, ranks)
    assert result.factors.ranks == ranks
    ours = relative_error(W, result.factors.reconstruct())
    assert abs(ours - _tensorly_error(W, ranks)) <= 1e-4


@pytest.mark.parametrize("ranks", [(12, 5), (5, 12), (30, 29)])
def test_tucker_matches_tensorly_on_random_matrices_with_unequal_ranks(ranks):
    gen = torch.Generator().manual_seed(7)
    # A decaying spectrum, so the ranks matter (not an all-equal random spectrum).
    U = torch.linalg.qr(torch.randn(80, 50, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(60, 50, generator=gen)).Q
    W = (U * torch.logspace(0, -3, 50)) @ V.T
    factors = get_method("tucker").decompose(W, ranks).factors
    ours = relative_error(W, factors.reconstruct())
    assert abs(ours - _tensorly_error(W, ranks)) <= 1e-4
    assert ours == pytest.approx(_optimal(_spectrum(W), min(ranks)), rel=1e-5)  # the HOOI fixed point is rank min(r1, r2)


# --- SVD-LLM: truncation-aware whitening ---------------------------------------------------------------------
@pytest.mark.parametrize("role", ["q", "down"])
def test_svd_llm_beats_svd_on_whitened_error(weights, activations, role):
    W, X = weights[role], activations[role]
    stats = CalibrationStats(gram=_gram(X), n_tokens=X.shape[0])
    white = None
    for rank in (8, 64):
        llm = get_method("svd-llm").decompose(W, rank, stats)
        plain = get_method("svd").decompose(W, rank)
        e_llm = weighted_error(W, llm.factors.reconstruct(), stats)
        e_svd = weighted_error(W, plain.factors.reconstruct(), stats)
        assert e_llm < 0.95 * e_svd, (role, rank, e_llm, e_svd)
        # the direct check: the layer's outputs on the calibration tokens are closer
        out = X @ W.T
        assert (float(torch.linalg.norm(X @ llm.factors.reconstruct().T - out))
                < float(torch.linalg.norm(X @ plain.factors.reconstruct().T - out)))
        if not llm.fallbacks:  # exact Cholesky: SVD-LLM is optimal for the whitened objective
            if white is None:
                white = _spectrum(W.to(torch.float64) @ torch.linalg.cholesky(stats.gram))
            assert e_llm == pytest.approx(_optimal(white, rank), rel=1e-4)
            assert llm.extra["whitened_error"] == pytest.approx(e_llm, rel=1e-4)


def test_svd_llm_cholesky_fallback_chain_on_singular_gram(weights, activations, caplog):
    W = weights["q"]
    X = activations["q"][:256]  # 256 tokens < 576 features: XᵀX is singular
    gram = _gram(X)
    assert torch.linalg.matrix_rank(gram) < gram.shape[0]
    with caplog.at_level(logging.WARNING, logger="rankwise.decomposition.svd_llm"):
        result = get_method("svd-llm").decompose(W, 16, CalibrationStats(gram=gram, n_tokens=256))
    assert any("jitter" in note for note in result.fallbacks)
    assert any("jitter" in rec.getMessage() for rec in caplog.records)
    approx = result.factors.reconstruct()
    assert torch.isfinite(approx).all()
    plain = get_method("svd").decompose(W, 16).factors.reconstruct()
    assert weighted_error(W, approx, gram) < weighted_error(W, plain, gram)


def test_svd_llm_jitter_is_the_documented_formula_and_leaves_the_gram_alone(activations):
    """The jittered whitening (added in place on the diagonal, no identity matrix: at 7B widths each n × n
    float64 copy is up to 1 GB) is the Cholesky factor of sym(G) + eps·mean(diag)·I, bit for bit, and the
    caller's Gram is not modified."""
    from rankwise.decomposition.svd_llm import JITTERS, whitening

    gram = _gram(activations["q"][:256])  # singular: the first jitter is needed
    before = gram.clone()
    notes: list[str] = []
    got = whitening(gram, gram.shape[0], notes)
    assert got.kind == "cholesky+jitter" and torch.equal(gram, before)
    sym = 0.5 * (gram + gram.T)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    by_hand = torch.linalg.cholesky(sym + JITTERS[0] * float(torch.diagonal(sym).mean()) * eye)
    assert torch.equal(got.S, by_hand)


def test_svd_llm_eigendecomposition_fallback_on_indefinite_gram(weights, activations, caplog):
    W = weights["q"]
    gram = _gram(activations["q"])
    v = torch.randn(gram.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # v·Gram·v/‖v‖² ≈ trace/n for a random v, so subtracting trace/2 along v leaves a large negative eigenvalue
    # (far beyond what a 1e-2·mean(diag) jitter repairs) while the diagonal stays positive.
    bad = gram - 0.5 * float(torch.diagonal(gram).sum()) * torch.outer(v, v) / float(v @ v)
    with caplog.at_level(logging.WARNING, logger="rankwise.decomposition.svd_llm"):
        result = get_method("svd-llm").decompose(W, 16, CalibrationStats(gram=bad))
    assert any("eigendecomposition" in note for note in result.fallbacks)
    assert any("eigendecomposition" in rec.getMessage() for rec in caplog.records)
    assert torch.isfinite(result.factors.reconstruct()).all()


def test_svd_llm_spectrum_is_the_whitened_one(weights, activations):
    W, gram = weights["q"], _gram(activations["q"])
    got = get_method("svd-llm").singular_values(W, CalibrationStats(gram=gram)).to(torch.float64)
    ref = torch.linalg.svdvals(W.to(torch.float64) @ torch.linalg.cholesky(gram))
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref[0])


# --- ASVD and FWSVD: each optimal for its own weighting ------------------------------------------------------
def test_asvd_differs_from_svd_and_wins_on_scaled_error(weights, activations):
    W, X = weights["q"], activations["q"]
    stats = CalibrationStats(act_abs_mean=X.abs().mean(dim=0), n_tokens=X.shape[0])
    S = stats.act_abs_mean.to(torch.float64) ** 0.5
    scaled = _spectrum(W.to(torch.float64) * S)
    for rank in (8, 64):
        asvd = get_method("asvd").decompose(W, rank, stats).factors.reconstruct()
        plain = get_method("svd").decompose(W, rank).factors.reconstruct()
        assert relative_error(plain, asvd) > 1e-2  # a genuinely different approximation
        e_asvd = relative_error(W.to(torch.float64) * S, asvd.to(torch.float64) * S)
        e_svd = relative_error(W.to(torch.float64) * S, plain.to(torch.float64) * S)
        assert e_asvd < e_svd
        assert e_asvd == pytest.approx(_optimal(scaled, rank), rel=1e-4)


def test_asvd_guards_dead_channels(weights, activations):
    W = weights["q"]
    act = activations["q"].abs().mean(dim=0)
    act[:5] = 0.0
    result = get_method("asvd").decompose(W, 8, CalibrationStats(act_abs_mean=act))
    assert result.fallbacks and "zero activation" in result.fallbacks[0]
    assert torch.isfinite(result.factors.B).all()


def test_fwsvd_differs_from_svd_and_wins_on_fisher_weighted_error(weights, fisher):
    for role in ("q", "down"):
        W, F = weights[role], fisher[role]
        stats = CalibrationStats(fisher=F)
        row = F.to(torch.float64).sum(dim=1).sqrt()[:, None]
        weighted = _spectrum(row * W.to(torch.float64))
        for rank in (8, 64):
            fw = get_method("fwsvd").decompose(W, rank, stats)
            approx = fw.factors.reconstruct()
            plain = get_method("svd").decompose(W, rank).factors.reconstruct()
            assert relative_error(plain, approx) > 1e-2
            e_fw = relative_error(row * W.to(torch.float64), row * approx.to(torch.float64))
            e_svd = relative_error(row * W.to(torch.float64), row * plain.to(torch.float64))
            assert e_fw < e_svd
            assert e_fw == pytest.approx(_optimal(weighted, rank), rel=1e-4)
            assert fw.extra["fisher_weighted_error"] == pytest.approx(e_fw, rel=1e-3)
        # row sums are accepted too (what a memory-saving calibration may store)
        again = get_method("fwsvd").decompose(W, 8, CalibrationStats(fisher=F.double().sum(dim=1))).factors.reconstruct()
        assert torch.allclose(again, get_method("fwsvd").decompose(W, 8, stats).factors.reconstruct(), atol=1e-5)


def test_fwsvd_guards_zero_rows(weights, fisher):
    F = fisher["q"].clone()
    F[:3] = 0.0
    result = get_method("fwsvd").decompose(weights["q"], 8, CalibrationStats(fisher=F))
    assert result.fallbacks and "zero Fisher" in result.fallbacks[0]
    assert torch.isfinite(result.factors.A).all()


def test_weighted_error_is_the_output_error(weights, activations):
    W, X = weights["q"], activations["q"]
    approx = get_method("svd").decompose(W, 8).factors.reconstruct()
    direct = float(torch.linalg.norm(X.double() @ (W - approx).double().T) / torch.linalg.norm(X.double() @ W.double().T))
    assert weighted_error(W, approx, _gram(X)) == pytest.approx(direct, rel=1e-6)
    assert math.isclose(weighted_error(W, W, _gram(X)), 0.0, abs_tol=1e-9)


@pytest.mark.parametrize("method", ["tucker", "svd"])
def test_half_precision_weights_give_float32_factors(weights, method):
    W16 = weights["q"].to(torch.bfloat16)
    result = get_method(method).decompose(W16, 8)
    assert result.factors.A.dtype == torch.float32 and result.factors.B.dtype == torch.float32
    W = W16.float()
    assert relative_error(W, result.factors.reconstruct()) == pytest.approx(_optimal(_spectrum(W), 8), rel=1e-5)


def test_error_metrics_by_row_blocks_equal_the_whole_matrix_formulas():
    """The relative and activation-weighted errors, computed a block of rows at a time (never a whole float64
    copy of W), equal the one-matrix float64 formulas on a weight of many blocks and on tiny ones."""
    import math

    from rankwise.decomposition.base import _row_step, relative_error, weighted_error

    gen = torch.Generator().manual_seed(3)
    for m, n in [(1536, 576), (200, 70), (1, 1)]:
        W = torch.randn(m, n, generator=gen)
        approx = W + 0.1 * torch.randn(m, n, generator=gen)
        X = torch.randn(2 * n + 3, n, generator=gen, dtype=torch.float64)
        gram = X.T @ X
        w, e = W.double(), W.double() - approx.double()
        assert relative_error(W, approx) == pytest.approx(float(e.norm() / w.norm()), rel=1e-12)
        direct = math.sqrt(float(((e @ gram) * e).sum()) / float(((w @ gram) * w).sum()))
        assert weighted_error(W, approx, gram) == pytest.approx(direct, rel=1e-12)
    assert math.ceil(1536 / _row_step(torch.empty(1536, 576))) > 10  # many blocks
    assert relative_error(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0

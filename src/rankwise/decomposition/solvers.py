"""Truncated-SVD solvers, chosen by rank and shape: every method reduces to "top-r singular triplets".

Measured on the SmolLM2 weights (single thread, see bench/decompose_speed.py), LAPACK's ``gesdd``
(``torch.linalg.svd``) is the slowest way to get a truncated SVD of these matrices: it computes all
min(m, n) triplets of an m×n matrix. Two faster routes, both exact in the Eckart–Young sense:

* ``gram``: eigendecomposition of the Gram matrix of the *smaller* side (WᵀW or WWᵀ, k×k with
  k = min(m, n)): W·V = U·diag(s). The reconstruction U·diag(s)·Vᵀ = W·V·Vᵀ is an orthogonal projection
  of W, so its error is ‖W‖² − Σ_{i<=r} s_i² exactly; rounding in the float32 Gram only perturbs the
  eigenvalues by ~1e-7·s_1², so it is used when the discarded energy is well above that
  (tail >= TAIL_GUARD · s_1²) and redone in float64 otherwise (ranks near min(m, n)).
* ``krylov`` (small ranks, e.g. the paper's rank 1): randomized block Krylov iteration on the same Gram
  (Musco & Musco 2015) with a seeded start and an *a-posteriori* stopping rule: the excess squared error
  of a projection is Σ_{i<=r}(s_i² − ŝ_i²), and the Ritz values ŝ_i² increase monotonically towards s_i²,
  so the iteration stops once one more block raises Σŝ_i² by less than KRYLOV_TOL × the remaining tail.
  LM weights have flat spectra (s_2/s_1 ≈ 0.7-0.95), where plain power/subspace iteration
  (torch.svd_lowrank) stalls at ~1e-3 excess error; block Krylov reaches ~1e-9.
  It falls back to the full eigendecomposition if the basis would grow past a quarter of k.

``lapack`` stays available as the reference. All solvers return U (m×r), s (r,) and V (n×r) in float32
(float64 input stays float64), s descending, deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOLVERS: tuple[str, ...] = ("auto", "gram", "krylov", "lapack")

TAIL_GUARD = 0.05  # float32 Gram is trusted while the discarded energy is >= 5% of s_1²
KRYLOV_OVERSAMPLE = 2  # block size r + 2 (smaller blocks, more but cheaper steps: fastest measured)
KRYLOV_TOL = 1e-9  # stop when the last block raised Σŝ² by < 1e-9 × remaining tail energy
KRYLOV_MAX_FRACTION = 0.25  # basis width cap, as a fraction of k = min(m, n)
KRYLOV_MIN_DIM = 384  # below this the full eigendecomposition is cheaper anyway
DEFLATION_TOL = 1e-10  # a new Krylov direction shorter than this × s_1² means G is (numerically) rank-deficient
SEED = 0


@dataclass
class SVDResult:
    """Top-r singular triplets, M ≈ U·diag(s)·Vᵀ, and the solver that produced them."""

    U: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    V: torch.Tensor  # (n, r)
    solver: str


def _work(matrix: torch.Tensor) -> torch.Tensor:
    return matrix if matrix.dtype == torch.float64 else matrix.to(torch.float32)


def choose_solver(rank: int, m: int, n: int, oversample: int = KRYLOV_OVERSAMPLE) -> str:
    """'krylov' for tiny ranks of large-enough matrices, else 'gram'.

    Measured (CPU ms per SmolLM2 matrix, one thread): at k = 576, Krylov takes 16-35 ms at r <= 2 against
    39-54 ms for the full eigendecomposition, breaks even near r = 3-4 and loses beyond; at k = 192 the
    eigendecomposition (~3 ms) always wins. The rule r + 2 <= k / 144 keeps Krylov to r <= 2 at k = 576
    and lets it scale to r <= 26 at k = 4096, where the k³ eigendecomposition grows much faster.
    The rule bounds the Krylov block width r + oversample, which is what sets Krylov's cost.
    """
    k = min(m, n)
    return "krylov" if k >= KRYLOV_MIN_DIM and rank + oversample <= k / 144 else "gram"


def lapack_svd(matrix: torch.Tensor, rank: int) -> SVDResult:
    """Thin LAPACK SVD (gesdd via torch.linalg.svd), truncated: the reference solver."""
    U, s, Vh = torch.linalg.svd(_work(matrix), full_matrices=False)
    return SVDResult(U[:, :rank].contiguous(), s[:rank].contiguous(), Vh[:rank].T.contiguous(), "lapack")


def _gram(M: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Gram matrix of the smaller side, and whether it is M·Mᵀ (its eigenvectors are then U, not V).

    A plain matmul: BLAS ``syrk`` (scipy) halves the flops, but scipy's OpenBLAS keeps its own thread pool,
    which torch.set_num_threads does not govern; on shared cores its extra threads made it 3x slower.
    """
    m, n = M.shape
    return (M @ M.T, True) if m <= n else (M.T @ M, False)


def _from_eigvecs(M: torch.Tensor, Q: torch.Tensor, lam: torch.Tensor, left: bool, solver: str) -> SVDResult:
    """Singular triplets from eigenpairs of the Gram: the other side is M·v/s (or Mᵀ·u/s)."""
    s = lam.clamp_min(0).sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if left:
        U, V = Q, (M.T @ Q) / safe
    else:
        U, V = (M @ Q) / safe, Q
    return SVDResult(U.contiguous(), s.to(M.dtype).contiguous(), V.contiguous(), solver)


def _tail_ok(lam_desc: torch.Tensor, rank: int, trace: float) -> bool:
    """Whether the discarded energy is far enough above float32 rounding of the Gram."""
    top = float(lam_desc[0]) if lam_desc.numel() else 0.0
    if top <= 0.0:
        return True
    tail = trace - float(lam_desc[:rank].to(torch.float64).sum())
    return tail >= TAIL_GUARD * top


def gram_svd(matrix: torch.Tensor, rank: int) -> SVDResult:
    """Top-r triplets from the full eigendecomposition of the smaller Gram (float64 if needed)."""
    M = _work(matrix)
    G, left = _gram(M)
    lam, Q = torch.linalg.eigh(G)
    lam, Q = lam.flip(0), Q.flip(1)
    if M.dtype == torch.float64:
        return _from_eigvecs(M, Q[:, :rank], lam[:rank], left, "gram-f64")
    if _tail_ok(lam, rank, float(torch.diagonal(G).to(torch.float64).sum())):
        return _from_eigvecs(M, Q[:, :rank].contiguous(), lam[:rank], left, "gram")
    res = gram_svd(M.to(torch.float64), rank)
    return SVDResult(res.U.float(), res.s.float(), res.V.float(), "gram-f64")


def _krylov_eig(G: torch.Tensor, rank: int,
                oversample: int = KRYLOV_OVERSAMPLE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-r eigenpairs of a PSD G (float64) by block Krylov + Rayleigh–Ritz; None if not converged.

    G·Q is kept and extended block by block, so each step costs one k×k×block product plus the
    re-orthogonalization, not a fresh projection of G.
    """
    k = G.shape[0]
    block = rank + oversample
    max_width = int(KRYLOV_MAX_FRACTION * k)
    trace = float(torch.diagonal(G).sum())
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    start = torch.randn(k, block, generator=gen, dtype=G.dtype).to(G.device)  # seeded on CPU: same on any device
    Q = torch.linalg.qr(G @ start).Q
    GQ = G @ Q
    last: float | None = None
    while True:
        T = Q.T @ GQ
        lam, Z = torch.linalg.eigh(0.5 * (T + T.T))
        kept = float(lam[-rank:].sum())
        if last is not None and kept - last <= KRYLOV_TOL * max(trace - kept, 1e-300):
            return lam[-rank:].flip(0), Q @ Z[:, -rank:].flip(1)
        if Q.shape[1] + block > max_width:
            return None
        last = kept
        Y = GQ[:, -block:]
        for _ in range(2):  # block Gram–Schmidt twice: keeps the basis orthonormal to working precision
            Y = Y - Q @ (Q.T @ Y)
        Qn, R = torch.linalg.qr(Y)
        if float(torch.diagonal(R).abs().min()) <= DEFLATION_TOL * float(lam[-1]):
            return None  # the Krylov space is (nearly) exhausted: a rank-deficient G; use the full eigh
        Q = torch.cat([Q, Qn], dim=1)
        GQ = torch.cat([GQ, G @ Qn], dim=1)


def krylov_svd(matrix: torch.Tensor, rank: int, oversample: int = KRYLOV_OVERSAMPLE) -> SVDResult:
    """Top-r triplets by randomized block Krylov on the smaller Gram; falls back to :func:`gram_svd`."""
    M = _work(matrix)
    G, left = _gram(M)
    trace = float(torch.diagonal(G).to(torch.float64).sum())
    # The iteration runs in float64 (cheap at k up to a few thousand) so its stopping rule is not fooled by
    # float32 noise; the Gram's own float32 rounding is checked by the tail guard, as in gram_svd.
    found = _krylov_eig(G.to(torch.float64), rank, oversample)
    if found is None:
        return gram_svd(M, rank)
    lam, Q = found
    if M.dtype != torch.float64 and not _tail_ok(lam, rank, trace):
        return gram_svd(M, rank)
    return _from_eigvecs(M, Q.to(M.dtype), lam.to(M.dtype), left, "krylov")


def truncated_svd(matrix: torch.Tensor, rank: int, solver: str = "auto",
                  oversample: int = KRYLOV_OVERSAMPLE) -> SVDResult:
    """Top-``rank`` singular triplets of ``matrix`` with the named (or automatically chosen) solver.

    ``oversample`` is Krylov's extra block width (block = rank + oversample); the other solvers are exact
    and ignore it.
    """
    m, n = matrix.shape
    if solver == "auto":
        solver = choose_solver(rank, m, n, oversample)
    if solver == "krylov":
        return krylov_svd(matrix, rank, oversample)
    if solver == "gram":
        return gram_svd(matrix, rank)
    if solver == "lapack":
        return lapack_svd(matrix, rank)
    raise ValueError(f"unknown SVD solver '{solver}' (known: {', '.join(SOLVERS)})")

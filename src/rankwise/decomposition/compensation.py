"""Error compensation: after truncation, refit the kept output factor so the layer's *outputs* stay close.

A factorized layer computes y = A·(Pᵀx) (+ b), where Pᵀ = G·Bᵀ is the fixed input projection (its first
factor, and core if any) and A the output factor. Given calibration inputs, the A that minimizes the
layer's output error is a least-squares solution in closed form:

    min_A ‖X_d·Wᵀ − X_c·P·Aᵀ‖_F   ⇒   A = W·C·P·(Pᵀ·G_c·P)⁻¹,   C = X_dᵀ·X_c,  G_c = X_cᵀ·X_c

with X_d the layer's inputs in the dense model and X_c its inputs in the model being compressed. Two modes
(the plan's ``compensate``):

* ``true``: X_c = X_d (the usual calibration pass), so C = G_c = XᵀX: the update of SVD-LLM's
  closed-form step. For SVD-LLM's own whitened truncation the refit is already optimal (A = U·√Σ is the
  least-squares solution for its B), so this changes nothing there up to rounding; it helps SVD, ASVD and
  Tucker, whose truncations ignore the inputs (or weigh them only by a diagonal).
* ``"sequential"``: each layer is calibrated on the inputs of the *already compressed* model (as
  SAES-SVD corrects errors accumulated from earlier layers): blocks are processed in order on two streams
  of hidden states, dense and compressed; within a block, projections are taken in data-flow stages
  (those reading the same input together: q/k/v, then o, then gate/up, then down), each stage's truncation
  uses statistics of its compressed-stream inputs, and its output factor is refit against the dense
  stream's outputs (C = X_dᵀX_c). Costs about six block forwards per block over the calibration set.

All algebra is float64; a ridge of 1e-8·mean(diag) keeps Pᵀ·G_c·P invertible for dead directions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.decomposition.base import CalibrationStats, DecompositionMethod, relative_error, weighted_error
from rankwise.errors import DataError
from rankwise.layers.factorized import FactorizedLinear

RIDGE = 1e-8


def refit_output_factor(layer: FactorizedLinear, weight: torch.Tensor, cross: torch.Tensor,
                        gram: torch.Tensor) -> None:
    """Set ``layer``'s output factor to argmin_A ‖X_d·Wᵀ − X_c·P·Aᵀ‖ (in place).

    ``weight`` is the dense W (m×n); ``cross`` = X_dᵀ·X_c and ``gram`` = X_cᵀ·X_c (n×n; pass the same Gram
    twice for the one-pass mode).
    """
    with torch.no_grad():
        B_t = layer.first.weight.detach().to(torch.float64)  # (r2, n)
        P_t = B_t if layer.core is None else layer.core.weight.detach().to(torch.float64) @ B_t  # (r1, n)
        G = gram.detach().to(torch.float64).to(P_t.device)
        C = cross.detach().to(torch.float64).to(P_t.device)
        W = weight.detach().to(torch.float64).to(P_t.device)
        GP = G @ P_t.T  # (n, r)
        M = P_t @ GP  # Pᵀ·G_c·P, (r, r)
        M = 0.5 * (M + M.T)
        scale = float(torch.diagonal(M).mean()) if M.numel() else 0.0
        if scale <= 0.0:
            return  # no signal in the calibration inputs along the kept directions: keep the truncation
        M = M + RIDGE * scale * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        rhs = W @ (C @ P_t.T)  # W·C·P, (m, r)
        A = torch.linalg.solve(M, rhs.T).T
        if not bool(torch.isfinite(A).all()):
            return
        layer.last.weight.copy_(A.to(layer.last.weight.dtype))


def refresh_errors(record: Any, layer: nn.Module, weight: torch.Tensor, gram: torch.Tensor | None) -> None:
    """Re-measure a target report's errors after its factors changed."""
    if not isinstance(layer, FactorizedLinear):
        return
    dense = layer.dense_weight()
    record.rel_error = relative_error(weight, dense)
    if gram is not None:
        record.weighted_error = weighted_error(weight, dense, gram)


# --- sequential mode ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Ends a block forward once the hooked projections have seen their inputs."""


@dataclass
class _Inputs:
    """Inputs of one projection over all calibration batches (rows = tokens), on the model's device."""

    parts: list[torch.Tensor]

    def cat(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=0)


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module], store: dict[str, list[torch.Tensor]], stop: bool) -> Iterator[None]:
    """Record each module's input (flattened to tokens × features); optionally stop once all have fired."""
    seen: set[str] = set()
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            store.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).clone())
            seen.add(name)
            if stop and len(seen) == len(modules):
                raise _Stop
            return None

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(make(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, batch_size: int
                  ) -> list[tuple[torch.Tensor, tuple, dict]]:
    """(hidden state, other args, kwargs) entering ``block`` for each batch of ``ids`` (the model stops there)."""
    out: list[tuple[torch.Tensor, tuple, dict]] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        rest = args[1:] if args else ()
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        out.append((h.detach().clone(), rest, kw))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids=ids[s : s + batch_size], use_cache=False)
    finally:
        handle.remove()
    return out


def _run(block: nn.Module, h: torch.Tensor, rest: tuple, kw: dict) -> torch.Tensor:
    out = block(h, *rest, **kw)
    return out[0] if isinstance(out, tuple) else out


def stages(roles: Sequence[str], inputs: dict[str, list[torch.Tensor]]) -> list[list[str]]:
    """Consecutive roles (in data-flow order) that read the very same input form one stage."""
    groups: list[list[str]] = []
    for role in roles:
        if groups and torch.equal(inputs[groups[-1][0]][0], inputs[role][0]):
            groups[-1].append(role)
        else:
            groups.append([role])
    return groups


def stats_from(x: torch.Tensor, needs: frozenset[str]) -> CalibrationStats:
    """The activation statistics a method reads, from inputs x (tokens × n)."""
    if "fisher" in needs:
        raise DataError("compensate: sequential cannot collect Fisher information (fwsvd); use compensate: true")
    x64 = x.to(torch.float64)
    st = CalibrationStats(n_tokens=int(x.shape[0]))
    st.gram = x64.T @ x64
    if "act_abs_mean" in needs:
        st.act_abs_mean = x64.abs().mean(0)
    if "act_sq_mean" in needs:
        st.act_sq_mean = (x64 * x64).mean(0)
    return st


def calibration_tokens(model: nn.Module, calibration: Any, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration token windows for the sequential pass (settings or ids; statistics cannot be reused)."""
    from rankwise.calibration.data import CalibrationConfig, calibration_ids

    if isinstance(calibration, torch.Tensor):
        return calibration, {"source": "token ids given by the caller", "compensate": "sequential"}
    if calibration is not None and not isinstance(calibration, CalibrationConfig):
        raise DataError("compensate: sequential recomputes statistics on the compressed model: pass calibration "
                        "settings or token ids, not precomputed statistics")
    config = calibration or CalibrationConfig()
    if tokenizer is None:
        raise DataError("compensate: sequential needs calibration text and the model's tokenizer: pass tokenizer=...")
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    ids = calibration_ids(tokenizer, config, max_len if isinstance(max_len, int) else None)
    return ids, {**config.describe(), "n_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                 "n_tokens": int(ids.numel()), "compensate": "sequential", "cache_hit": False}


def decompose_sequential(model: nn.Module, adapter: Any, chosen: Sequence[tuple[Any, Any]],
                         methods: Mapping[Any, DecompositionMethod], ids: torch.Tensor,
                         decompose_one: Callable[[Any, Any, DecompositionMethod, CalibrationStats], Any],
                         batch_size: int = 4, advance: Callable[[int], None] | None = None) -> list[Any]:
    """Decompose ``chosen`` (TargetInfo, DecompSpec) block by block on the compressed model's own inputs.

    ``decompose_one(info, spec, method, stats)`` truncates one target and swaps it in (the surgery's
    per-target step, returning its report); this function supplies the statistics and refits afterwards.
    Returns the reports in the order decomposed.
    """
    if len(getattr(adapter, "stacks", ((None, 0),))) != 1:
        raise DataError("compensate: sequential supports models with one stack of blocks (decoder- or encoder-only)")
    device = next(model.parameters()).device
    ids = ids.to(device)
    by_layer: dict[int, list[tuple[Any, Any]]] = {}
    for info, spec in chosen:
        by_layer.setdefault(info.layer, []).append((info, spec))
    if not by_layer:
        return []
    first = min(by_layer)
    batches = _block_inputs(model, adapter.block(first), ids, batch_size)
    h_dense = [b[0] for b in batches]
    h_comp = [b[0].clone() for b in batches]
    records: list[Any] = []
    last = max(by_layer)
    with torch.no_grad():
        for layer in range(first, last + 1):
            block = adapter.block(layer)
            todo = by_layer.get(layer, [])
            if todo:
                roles = [info.role for info, _ in todo]
                modules = {info.role: adapter.linear(layer, info.role) for info, _ in todo}
                dense_in: dict[str, list[torch.Tensor]] = {}
                with _capture(modules, dense_in, stop=False):
                    next_dense = [_run(block, h, b[1], b[2]) for h, b in zip(h_dense, batches, strict=True)]
                x_dense = {r: torch.cat(v) for r, v in dense_in.items()}
                specs = {info.role: (info, spec) for info, spec in todo}
                for stage in stages(roles, dense_in):
                    comp_in: dict[str, list[torch.Tensor]] = {}
                    with _capture({r: modules[r] for r in stage}, comp_in, stop=True):
                        for h, b in zip(h_comp, batches, strict=True):
                            with contextlib.suppress(_Stop):
                                _run(block, h, b[1], b[2])
                    x_c = torch.cat(comp_in[stage[0]])
                    for role in stage:
                        info, spec = specs[role]
                        method = methods[spec.method]
                        st = stats_from(x_c, method.needs)
                        weight = adapter.weight(layer, role).detach().clone()
                        record = decompose_one(info, spec, method, st)
                        new = adapter.linear(layer, role)
                        if isinstance(new, FactorizedLinear):
                            xd = x_dense[role].to(torch.float64)
                            cross = xd.T @ x_c.to(torch.float64)
                            refit_output_factor(new, weight, cross, st.gram)
                            refresh_errors(record, new, weight, st.gram)
                        records.append(record)
                        if advance is not None:
                            advance(1)
                    del comp_in, x_c
                del dense_in, x_dense
            else:
                next_dense = [_run(block, h, b[1], b[2]) for h, b in zip(h_dense, batches, strict=True)]
            h_comp = [_run(block, h, b[1], b[2]) for h, b in zip(h_comp, batches, strict=True)]
            h_dense = next_dense
    return records

"""The ideal speedup of a decomposed model, and how much of it a measurement realizes.

Two bounds, because a forward pass is limited by one of two things:

* **bytes** (memory-bound: decode at small batch). One decode step reads every weight once, whatever the
  batch: all block weights at their real (factor) shapes, norms, the *whole* LM head (V x d: for
  SmolLM2-135M 28 M parameters, a fifth of the model, read every step and never decomposed), one embedding
  row per sequence, and the KV cache of each sequence. The ideal speedup is dense bytes / decomposed bytes.
* **FLOPs** (compute-bound: prefill and scoring). The ideal speedup is dense FLOPs / decomposed FLOPs
  (:mod:`rankwise.efficiency.flops`).

Activations, kernel launches and framework overhead are not in either bound; that is exactly what the gap
between ideal and measured shows. Two ways to state the gap, both reported and labelled:

* ``realized`` = measured speedup / ideal speedup (1.0: the bound is reached);
* ``gain_realized`` = (measured − 1) / (ideal − 1): the share of the *possible saving* obtained
  (stricter; undefined when the ideal is within 1% of 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from rankwise.efficiency.flops import attention_shape, decode_flops, prefill_flops


@dataclass(frozen=True)
class ByteCount:
    """Bytes read by one decode step, by part."""

    weights: int  # block weights (factor shapes), norms, other parameters read in full
    lm_head: int  # the output projection, read in full every step (tied or not)
    embedding_rows: int  # one row per sequence from each embedding table
    kv_cache: int  # keys and values of every layer for context_len + 1 positions, per sequence

    @property
    def total(self) -> int:
        return self.weights + self.lm_head + self.embedding_rows + self.kv_cache

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def decode_bytes(model: nn.Module, context_len: int, batch: int = 1) -> ByteCount:
    """Bytes one decode step reads with ``context_len`` tokens already cached (see the module docstring)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    head_weight = getattr(head, "weight", None) if head is not None else None
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    table_ids = {id(m.weight) for m in embeddings}
    weights = lm_head = 0
    elem = 4
    for p in _unique_params(model):
        nbytes = p.numel() * p.element_size()
        elem = p.element_size() if p.is_floating_point() else elem
        if head_weight is not None and p is head_weight:
            lm_head += nbytes
        elif id(p) in table_ids:
            continue  # only the looked-up rows are read (counted below)
        else:
            weights += nbytes
    rows = sum(batch * m.embedding_dim * m.weight.element_size() for m in embeddings)
    att = attention_shape(model)
    kv = att.n_layers * 2 * att.kv_width * (context_len + 1) * batch * elem
    return ByteCount(weights=weights, lm_head=lm_head, embedding_rows=rows, kv_cache=kv)


@dataclass(frozen=True)
class Ideal:
    """Ideal speedups of one workload from bytes and from FLOPs (dense / decomposed)."""

    workload: str
    bytes_dense: int | None
    bytes_decomposed: int | None
    flops_dense: int
    flops_decomposed: int

    @property
    def bytes_speedup(self) -> float | None:
        if not self.bytes_dense or not self.bytes_decomposed:
            return None
        return self.bytes_dense / self.bytes_decomposed

    @property
    def flops_speedup(self) -> float:
        return self.flops_dense / self.flops_decomposed if self.flops_decomposed else float("inf")

    @property
    def bound(self) -> str:
        """Which bound is the relevant ideal: bytes for decode steps, FLOPs for full passes."""
        return "bytes" if self.bytes_dense is not None else "flops"

    @property
    def speedup(self) -> float:
        value = self.bytes_speedup if self.bound == "bytes" else self.flops_speedup
        return float(value) if value is not None else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_speedup": self.bytes_speedup, "flops_speedup": self.flops_speedup,
                "bound": self.bound, "ideal_speedup": self.speedup}


def ideal_decode(dense: nn.Module, decomposed: nn.Module, context_len: int, batch: int = 1) -> Ideal:
    """Ideal speedup of one decode step (bytes bound; the FLOPs bound alongside)."""
    return Ideal(workload=f"decode b={batch} ctx={context_len}",
                 bytes_dense=decode_bytes(dense, context_len, batch).total,
                 bytes_decomposed=decode_bytes(decomposed, context_len, batch).total,
                 flops_dense=decode_flops(dense, context_len, batch).total,
                 flops_decomposed=decode_flops(decomposed, context_len, batch).total)


def ideal_prefill(dense: nn.Module, decomposed: nn.Module, seq_len: int, batch: int = 1,
                  logits: str = "last") -> Ideal:
    """Ideal speedup of a full forward pass (FLOPs bound)."""
    return Ideal(workload=f"prefill b={batch} s={seq_len} logits={logits}", bytes_dense=None,
                 bytes_decomposed=None,
                 flops_dense=prefill_flops(dense, seq_len, batch, logits).total,
                 flops_decomposed=prefill_flops(decomposed, seq_len, batch, logits).total)


def realized(measured: float | None, ideal: float | None) -> dict[str, float | None]:
    """How much of an ideal speedup a measured one reaches, in both conventions (module docstring)."""
    if measured is None or ideal is None or ideal != ideal:
        return {"realized": None, "gain_realized": None}
    gain = (measured - 1.0) / (ideal - 1.0) if ideal > 1.01 else None
    return {"realized": measured / ideal, "gain_realized": gain}

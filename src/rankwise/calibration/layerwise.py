"""Block-by-block calibration: the calibration set's hidden states flow through one block at a time.

Why: one-pass calibration (:mod:`rankwise.calibration.stats`) runs the whole model and holds every target's
statistics at once (about 1 GB of Grams for SmolLM2-135M, about 30 GB at 7B). Streaming decomposition
(:mod:`rankwise.decomposition.streaming`) instead keeps only

* the hidden states of the calibration set at the current depth (N × L × d, in RAM or memory-mapped on
  disk: :class:`ActivationStore`), one store for the block's inputs and one for its outputs, swapped;
* the keyword arguments the model passes to every block (rotary position embeddings, attention mask,
  position ids), captured once per batch from the model's own forward (:func:`capture_block_inputs`), so
  masks and positions are exactly what the model computes;
* the statistics of one block's linears (:func:`block_stats`), collected by the very hooks and
  accumulators the one-pass collector uses, on the same batches, so the numbers agree with it.

Memory is then one block's weights plus these buffers, independent of the model's depth.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.calibration.stats import (
    ACTIVATION_FIELDS,
    CalibrationStats,
    StatsRequest,
    _Collector,
    batch_bounds,
)
from rankwise.errors import DataError

Progress = Callable[[int, int], None]
BlockKwargs = dict[str, Any]


class ActivationStore:
    """N × L × d hidden states of the calibration set at one depth, kept in RAM or memory-mapped on disk.

    ``offload="disk"`` backs the tensor by a file in ``folder`` (a shared file mapping: the kernel may drop
    its pages at any time, and it does not count as process data memory), so a long calibration set at
    7B+ widths need not fit in RAM. Batches are written and read by row range.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, offload: str = "cpu",
                 folder: str | Path | None = None) -> None:
        if offload not in ("cpu", "disk"):
            raise DataError(f"activation offload: {offload!r} must be cpu or disk")
        self.shape, self.dtype, self.offload = shape, dtype, offload
        self._file: Path | None = None
        if offload == "disk":
            fd, name = tempfile.mkstemp(prefix=".rankwise-activations-", suffix=".bin", dir=folder)
            numel = shape[0] * shape[1] * shape[2]
            size = numel * torch.empty((), dtype=dtype).element_size()
            with open(fd, "wb") as f:
                f.truncate(size)
            self._file = Path(name)
            self.data = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
        else:
            self.data = torch.empty(shape, dtype=dtype)

    def put(self, start: int, end: int, value: torch.Tensor) -> None:
        self.data[start:end].copy_(value.detach().to("cpu", self.dtype))

    def get(self, start: int, end: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.data[start:end].to(device)

    def close(self) -> None:
        """Free the tensor (and delete its file)."""
        self.data = torch.empty(0, dtype=self.dtype)
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None

    @property
    def nbytes(self) -> int:
        n = self.shape[0] * self.shape[1] * self.shape[2]
        return n * torch.empty((), dtype=self.dtype).element_size()


class _Caught(Exception):
    """Raised by :class:`_Catcher` to stop the model's forward at the first block."""

    def __init__(self, hidden: torch.Tensor, kwargs: BlockKwargs) -> None:
        super().__init__("caught")
        self.hidden, self.kwargs = hidden, kwargs


class _Catcher(nn.Module):
    """Stands in for block 0 and records what the model passes to it (and, so, to every block)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        # attributes the model's loop may read from a block (e.g. ``attention_type`` for per-layer masks)
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise DataError("streaming calibration: the model passes positional arguments to its blocks beyond "
                            "the hidden states; this architecture is not supported")
        raise _Caught(hidden, kwargs)


def _detached(value: Any) -> Any:
    """Keyword arguments kept for later block calls: tensors detached, caches dropped."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    return value


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, bounds: Sequence[int],
                         store: ActivationStore, device: torch.device | str,
                         forward_kwargs: Mapping[str, Any] | None = None) -> list[BlockKwargs]:
    """Run the model's stem (embeddings, rotary, mask) on each batch; write block 0's inputs to ``store``.

    Only the modules before block 0 need real weights: the forward is stopped at block 0. Returns, per
    batch, the keyword arguments the model passes to its blocks (the same for every block here; models
    whose blocks get different masks per layer type are refused by the caller).
    """
    first = blocks[0]
    blocks[0] = _Catcher(first)
    kwargs_per_batch: list[BlockKwargs] = []
    try:
        for start, end in itertools.pairwise(bounds):
            batch = input_ids[start:end].to(device)
            try:
                with torch.no_grad():
                    model(input_ids=batch, **dict(forward_kwargs or {}))
            except _Caught as caught:
                store.put(start, end, caught.hidden)
                kw = {k: _detached(v) for k, v in caught.kwargs.items()
                      if k not in ("past_key_values", "cache", "past_key_value")}
                kwargs_per_batch.append(kw)
            else:
                raise DataError(f"streaming calibration: {type(model).__name__}'s forward never reached its "
                                "first block")
    finally:
        blocks[0] = first
    return kwargs_per_batch


def _output(value: Any) -> torch.Tensor:
    """A block's hidden-state output (blocks return a tensor, or a tuple starting with one)."""
    return value[0] if isinstance(value, tuple | list) else value


def _on(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_on(v, device) for v in value)
    return value


def run_block(block: nn.Module, inputs: ActivationStore, outputs: ActivationStore | None,
              kwargs_per_batch: Sequence[BlockKwargs], bounds: Sequence[int], device: torch.device | str,
              request: StatsRequest | None = None, progress: Progress | None = None
              ) -> dict[str, CalibrationStats]:
    """Forward every calibration batch through ``block`` (its inputs from ``inputs``, outputs written to
    ``outputs`` unless None); with ``request`` (module names *relative to the block* -> fields), collect
    those statistics with the one-pass collector's hooks and accumulators. Returns the statistics.
    """
    request = {name: frozenset(fields) for name, fields in (request or {}).items() if fields}
    unsupported = sorted({f for fields in request.values() for f in fields} - ACTIVATION_FIELDS)
    if unsupported:
        raise DataError(f"streaming calibration collects activation statistics only, not {', '.join(unsupported)} "
                        "(Fisher information needs the loss at the end of the model: use the whole-model path)")
    collector = _Collector(block, request) if request else None
    was_training = block.training
    block.eval()
    total = bounds[-1]
    try:
        if collector is not None:
            collector.attach()
        for i, (start, end) in enumerate(itertools.pairwise(bounds)):
            hidden = inputs.get(start, end, device)
            kw = _on(kwargs_per_batch[i], device)
            with torch.no_grad():
                out = _output(block(hidden, **kw))
            if outputs is not None:
                outputs.put(start, end, out)
            del out, hidden
            if collector is not None:
                collector.end_forward()
                collector.can_stop_early = False  # the block's output is needed: never stop a forward early
            if progress is not None:
                progress(end, total)
    finally:
        if collector is not None:
            collector.detach()
        block.train(was_training)
    return collector.results(request) if collector is not None else {}


def calibration_bounds(n_sequences: int, batch_size: int) -> list[int]:
    """The batches of the one-pass collector (same edges, so the same sums in the same order)."""
    return batch_bounds(n_sequences, batch_size)


@contextlib.contextmanager
def activation_stores(shape: tuple[int, int, int], dtype: torch.dtype, offload: str,
                      folder: str | Path | None = None):
    """Two stores (inputs, outputs) of ``shape``, closed (files deleted) on exit."""
    a = ActivationStore(shape, dtype, offload, folder)
    try:
        b = ActivationStore(shape, dtype, offload, folder)
    except BaseException:
        a.close()
        raise
    try:
        yield a, b
    finally:
        a.close()
        b.close()

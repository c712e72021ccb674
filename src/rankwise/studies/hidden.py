"""Reusing the hidden states at the first decomposed layer's input across trials.

A trial that decomposes only layers >= k leaves blocks 0..k-1 dense, so the input of block k is, call for
call, exactly what the dense model computes there. A worker records those inputs once per item set (the
dense pass records every layer, within a memory budget; a trial records the layers up to its first
decomposed one that are still missing) and later trials *replay* them: blocks before the recorded layer
are skipped and block k receives the recorded tensor. The remaining blocks then see bit-identical inputs,
so every metric is identical to a full forward pass; what is saved is k/L of the block compute.

Why it is exact and safe:

* the evaluation issues the same sequence of forward calls for the same items and options whatever the
  model's weights (batching depends on token lengths only), so calls are matched by their index within a
  measurement session, and each replayed tensor's shape is checked against the live one (a mismatch is a
  bug and raises rather than returning wrong numbers);
* calls that use a KV cache (``past_key_values`` given, or ``use_cache=True`` asked: the engine's shared
  prompt heads) run in full, since the skipped blocks would leave their cache layers empty;
* a recording is kept only if its whole session finished; blocks are swapped back in ``finally``.

It is used only for architectures whose blocks return a plain tensor (Llama-style decoders in transformers
5); anything else runs every block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rankwise.models.adapters import adapter_for


class _SkipBlock(nn.Module):
    """Stands in for a block before the replay layer: passes hidden states through on replayed calls."""

    def __init__(self, block: nn.Module, owner: HiddenStateCache) -> None:
        super().__init__()
        self.block = block
        self._owner = [owner]  # a list: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._owner[0].replaying:
            return args[0] if args else kwargs["hidden_states"]
        return self.block(*args, **kwargs)


class HiddenStateCache:
    """Recorded block inputs per layer and forward call (see the module docstring)."""

    def __init__(self, model: nn.Module, max_bytes: int) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.store: dict[int, list[torch.Tensor | None]] = {}
        self.bytes = 0
        self.replaying = False
        self.enabled = True
        self.verified = False  # blocks checked to return plain tensors (else replay would be wrong)
        self.replayed_calls = 0
        self.skipped_blocks = 0

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @contextlib.contextmanager
    def session(self, first_layer: int | None, record_all: bool = False) -> Iterator[None]:
        """Measure inside this context. ``first_layer``: the lowest layer the trial changes (replay from
        the highest recorded layer at or below it, record the missing ones up to it); ``record_all``: the
        dense pass, which records every layer it can afford."""
        if not self.enabled or (first_layer is None and not record_all):
            yield
            return
        adapter = adapter_for(self.model)
        top = adapter.n_layers - 1 if record_all else int(first_layer)  # type: ignore[arg-type]
        replay = max((lay for lay in self.store if lay <= top), default=None) if self.verified else None
        record = [lay for lay in range((replay + 1) if replay is not None else 0, top + 1) if lay not in self.store]
        parent_path, _, attr = adapter.blocks_path.rpartition(".")
        blocks: nn.ModuleList = getattr(self.model.get_submodule(parent_path) if parent_path else self.model, attr)
        originals = list(blocks)
        recordings: dict[int, list[torch.Tensor | None]] = {lay: [] for lay in record}
        state = {"call": -1, "replayable": False}
        handles = []

        def on_model(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            state["call"] += 1
            state["replayable"] = kwargs.get("past_key_values") is None and kwargs.get("use_cache") is not True
            self.replaying = replay is not None and state["replayable"]
            if self.replaying:
                self.replayed_calls += 1
                self.skipped_blocks += replay  # type: ignore[operator]

        def on_replay_block(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if not self.replaying:
                return None
            saved = self.store[replay][state["call"]]  # type: ignore[index]
            live = self._hidden(args, kwargs)
            if saved is None or saved.shape != live.shape:
                raise RuntimeError(f"hidden-state replay: call {state['call']} does not match the recording "
                                   f"({None if saved is None else tuple(saved.shape)} vs {tuple(live.shape)})")
            if args:
                return (saved, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": saved}

        def recorder(layer: int) -> Any:
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                calls = recordings[layer]
                calls.extend([None] * (state["call"] - len(calls)))
                calls.append(self._hidden(args, kwargs).detach() if state["replayable"] else None)
            return hook

        try:
            handles.append(self.model.register_forward_pre_hook(on_model, with_kwargs=True))
            if replay is not None:
                for i in range(replay):
                    blocks[i] = _SkipBlock(originals[i], self)
                handles.append(originals[replay].register_forward_pre_hook(on_replay_block, with_kwargs=True))
            for lay in record:
                handles.append(originals[lay].register_forward_pre_hook(recorder(lay), with_kwargs=True))
            if not self.verified:
                handles.append(originals[0].register_forward_hook(self._check_output))
            yield
            total_calls = state["call"] + 1
            for lay in record:
                calls = recordings[lay]
                calls.extend([None] * (total_calls - len(calls)))
                size = sum(t.numel() * t.element_size() for t in calls if t is not None)
                if self.bytes + size > self.max_bytes or not self.enabled:
                    break
                self.store[lay] = calls
                self.bytes += size
        finally:
            for h in handles:
                h.remove()
            for i, block in enumerate(originals):
                blocks[i] = block
            self.replaying = False

    def _check_output(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.verified = True
        else:  # blocks returning tuples: replay not supported, stay exact
            self.enabled = False
            self.store.clear()
            self.bytes = 0

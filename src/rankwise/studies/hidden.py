"""Reusing the hidden states at the first decomposed layer's input across trials.

A trial that decomposes only layers >= k leaves blocks 0..k-1 dense, so the input of block k is, call for
call, exactly what the dense model computes there. A worker records those inputs once per item set (the
dense pass records every layer, within a memory budget; a trial records the layers up to its first
decomposed one that are still missing) and later trials *replay* them: blocks before the recorded layer
are skipped and block k receives the recorded tensor. The remaining blocks then see bit-identical inputs,
so every metric is identical to a full forward pass; what is saved is k/L of the block compute.

Why it is exact and safe:

* a call's hidden states before the first changed block depend only on its token ids, attention mask
  and position ids, so recordings are keyed by a hash of those (a call never seen before simply runs in
  full), and each replayed tensor's shape is checked against the live one (a mismatch raises rather than
  returning wrong numbers);
* calls that use a KV cache (``cache``/``past_key_values`` given, or ``use_cache=True`` asked: the engine's shared
  prompt heads) run in full, since the skipped blocks would leave their cache layers empty;
* a recording is kept only if its whole session finished; blocks are swapped back in ``finally``.

It is used only for architectures whose blocks return a plain tensor (Llama-style decoders in transformers
5); anything else runs every block.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rankwise.models.adapters import adapter_for
from rankwise.models.forward import CACHE_ARGUMENTS


def call_key(args: tuple, kwargs: dict) -> str | None:
    """What decides the hidden states of a forward call: token ids, attention mask, position ids (hashed).
    None when the call has no token ids to identify it (e.g. embeddings passed directly)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        return None
    digest = hashlib.sha1()
    for name, value in (("ids", ids), ("mask", kwargs.get("attention_mask")), ("pos", kwargs.get("position_ids"))):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes())
        elif value is not None:
            return None  # a mask in some other form: do not guess
    return digest.hexdigest()


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
        self.store: dict[int, dict[str, torch.Tensor]] = {}
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
        recordings: dict[int, dict[str, torch.Tensor]] = {lay: {} for lay in record}
        state: dict[str, Any] = {"key": None}
        handles = []

        def on_model(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            replayable = (all(kwargs.get(name) is None for name in CACHE_ARGUMENTS)
                          and kwargs.get("use_cache") is not True)
            state["key"] = call_key(args, kwargs) if replayable else None
            self.replaying = replay is not None and state["key"] is not None and state["key"] in self.store[replay]
            if self.replaying:
                self.replayed_calls += 1
                self.skipped_blocks += replay  # type: ignore[operator]

        def on_replay_block(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if not self.replaying:
                return None
            saved = self.store[replay][state["key"]]  # type: ignore[index]
            live = self._hidden(args, kwargs)
            if saved.shape != live.shape or saved.dtype != live.dtype:
                raise RuntimeError(f"hidden-state replay: recorded {tuple(saved.shape)} vs live {tuple(live.shape)}")
            if args:
                return (saved, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": saved}

        pending = {"bytes": 0}

        def recorder(layer: int) -> Any:
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                if state["key"] is None or layer not in recordings:
                    return
                tensor = self._hidden(args, kwargs).detach()
                size = tensor.numel() * tensor.element_size()
                # Within the memory budget while recording, not only at the end: drop the highest layers
                # first (a lower recording serves every trial whose first changed layer is above it).
                while self.bytes + pending["bytes"] + size > self.max_bytes and recordings:
                    top_layer = max(recordings)
                    pending["bytes"] -= sum(t.numel() * t.element_size() for t in recordings.pop(top_layer).values())
                    if top_layer == layer:
                        return
                recordings[layer][state["key"]] = tensor
                pending["bytes"] += size
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
            for lay in sorted(recordings):
                calls = recordings[lay]
                size = sum(t.numel() * t.element_size() for t in calls.values())
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

"""Architecture adapters: a model's modules in the paper's vocabulary, found by structure.

An adapter says where a model's blocks are and which projection plays each *role* in a block. Everything
else in rankwise (plans, decomposition, accounting) speaks in (layer, role) and asks the adapter for the
module, so no other code knows module names.

How a model is read (:func:`adapter_for`), with no list of model types:

1. :class:`LayoutAdapter` - the standard layouts. Every ``nn.ModuleList`` whose elements are all blocks of
   a standard layout (:func:`rankwise.models.layouts.block_roles`: the one table of module-name patterns)
   is a *stack*; roles are canonical (``q, k, v, o, gate, up, down``; ``qkv``/``gate_up`` for fused
   projections; ``cross_q…cross_o`` for cross-attention; the BERT family reads as ``q, k, v, o, up, down``).
2. :class:`GenericAdapter` - anything else: the longest list of identical blocks that contain projections,
   with the projections' own dotted paths as roles (``self_attn.k_proj``, ``fc1``, ...).

A model-type-specific adapter can still be plugged in with :func:`register_adapter` (it wins over both).

**Layer numbering.** Layers are numbered 0..L-1 across all stacks in the order the model registers them:
a decoder-only or encoder-only model has one stack (its layers as transformers numbers them); an
encoder-decoder model (T5, BART) numbers its encoder blocks 0..E-1 and its decoder blocks E..E+D-1. A
role a block does not have (cross-attention in an encoder block) is simply not a target of that layer.

**Fused projections** (``qkv``, ``gate_up``) are one matrix and are decomposed as one matrix; splitting them
per role (separate ranks for q, k and v) is not supported.

**Transposed weights.** GPT-2's ``Conv1D`` stores its weight as (in, out); :meth:`ArchitectureAdapter.weight`
always returns the (out, in) matrix, and :class:`TargetInfo` always gives (out_features, in_features).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rankwise.errors import PlanError
from rankwise.layers.transposed import STORED_TRANSPOSED, as_transposed
from rankwise.models.layouts import (
    ATTENTION_ROLES,
    ROLE_ORDER,
    block_roles,
    is_factorized_like,
    is_transposed,
    projection_shape,
    projections,
    weight_matrix,
)

#: The self-attention roles of the paper's Llama-style decoders (``tensors: [q, k, v, o]``).
ATTN_ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class TargetInfo:
    """One decomposable weight: its place in the model and its shape ``(out_features, in_features)``."""

    layer: int
    role: str
    name: str  # dotted module path, e.g. "model.layers.3.self_attn.q_proj"
    out_features: int
    in_features: int
    bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Layer:
    """One block: its dotted path in the model, the module, and role -> projection path inside it."""

    path: str
    block: nn.Module
    roles: dict[str, str]


class ArchitectureAdapter:
    """Maps a model onto (layer, role).

    Subclasses either override :meth:`_discover` (as the structural adapters do) or, for a hand-written
    adapter registered with :func:`register_adapter`, set ``model_types``, ``block_paths`` (where the
    ``ModuleList`` of blocks may live, tried in order) and ``role_paths`` (role -> path inside a block).
    """

    model_types: tuple[str, ...] = ()
    block_paths: tuple[str, ...] = ()
    role_paths: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers: list[Layer] = self._discover(model)
        if not self._layers:
            raise PlanError(f"{type(model).__name__}: found no list of blocks with projections")
        #: (stack path, index of its first layer), in layer order.
        self.stacks: tuple[tuple[str, int], ...] = _stacks_of(self._layers)
        seen: dict[str, None] = {}
        for layer in self._layers:
            seen.update(dict.fromkeys(layer.roles))
        rank = {role: i for i, role in enumerate(ROLE_ORDER)}
        self._roles = tuple(sorted(seen, key=lambda r: rank.get(r, len(rank))))  # stable: extras keep their order

    # --- blocks -------------------------------------------------------------------------------------------
    def _discover(self, model: nn.Module) -> list[Layer]:
        for path in self.block_paths:
            module = _get(model, path)
            if isinstance(module, nn.ModuleList):
                return [Layer(f"{path}.{i}", block, dict(self.role_paths)) for i, block in enumerate(module)]
        raise PlanError(f"{type(self).__name__}: no block list at {', '.join(self.block_paths)}")

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def blocks_path(self) -> str:
        """The path of the (first) stack of blocks, e.g. ``model.layers``."""
        return self.stacks[0][0]

    def block(self, layer: int) -> nn.Module:
        return self._layers[layer].block

    def layer_of(self, name: str) -> int | None:
        """The layer a dotted module or parameter name belongs to (None: outside every block)."""
        for path, first in self.stacks:
            if name.startswith(path + "."):
                head = name[len(path) + 1:].split(".", 1)[0]
                return first + int(head) if head.isdigit() else None
        return None

    # --- roles --------------------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        """Every role of the model (the union over its blocks), in the paper's order."""
        return self._roles

    def roles_of(self, layer: int) -> tuple[str, ...]:
        """The roles block ``layer`` has (an encoder block of an encoder-decoder model has no ``cross_*``)."""
        return tuple(r for r in self.roles if r in self._layers[layer].roles)

    def role_groups(self) -> dict[str, tuple[str, ...]]:
        """Named groups of roles a plan may use: ``attn``, ``mlp`` and ``all``."""
        attn = tuple(r for r in self.roles if self.is_attention(r))
        mlp = tuple(r for r in self.roles if not self.is_attention(r))
        return {"attn": attn, "mlp": mlp, "all": self.roles}

    def is_attention(self, role: str) -> bool:
        lowered = role.lower()
        return (role in ATTENTION_ROLES or "attn" in lowered or "attention" in lowered
                or role.rsplit(".", 1)[-1] in ATTN_ROLES)

    def _path(self, layer: int, role: str) -> str:
        try:
            return self._layers[layer].roles[role]
        except KeyError:
            raise PlanError(f"layer {layer} has no {role} (its roles: {', '.join(self.roles_of(layer))})") from None

    def module_name(self, layer: int, role: str) -> str:
        return f"{self._layers[layer].path}.{self._path(layer, role)}"

    def linear(self, layer: int, role: str) -> nn.Module:
        """The module at (layer, role): an ``nn.Linear``, a ``Conv1D`` or an already-factorized layer."""
        return _get(self.block(layer), self._path(layer, role))

    def weight(self, layer: int, role: str) -> torch.Tensor:
        """The weight at (layer, role) as an (out_features, in_features) matrix (a view for ``Conv1D``)."""
        return weight_matrix(self.linear(layer, role))

    def is_transposed(self, layer: int, role: str) -> bool:
        """Whether the module stores its weight as (in, out) (``Conv1D``): its gradients are transposed too."""
        return is_transposed(self.linear(layer, role))

    def replace(self, layer: int, role: str, new: nn.Module) -> nn.Module:
        """Swap the module at (layer, role) through its parent (PEFT-style injection); returns the old one.

        A role stored transposed (``Conv1D``) stays so: a factorized layer put there is marked to merge back
        into a ``Conv1D``, and a plain ``nn.Linear`` put there is converted to one, so the model still saves
        and reloads as its own architecture.
        """
        parent_path, _, attr = self._path(layer, role).rpartition(".")
        parent = _get(self.block(layer), parent_path) if parent_path else self.block(layer)
        old = getattr(parent, attr)
        if is_transposed(old) or getattr(old, STORED_TRANSPOSED, False):
            if is_factorized_like(new):
                setattr(new, STORED_TRANSPOSED, True)
            elif isinstance(new, nn.Linear):
                new = as_transposed(new)
        setattr(parent, attr, new)
        return old

    def targets(self) -> list[TargetInfo]:
        """Every (layer, role) of the model with its shape, in layer-major, paper role order."""
        out = []
        for layer in range(self.n_layers):
            for role in self.roles_of(layer):
                mod = self.linear(layer, role)
                out_features, in_features = projection_shape(mod)
                out.append(TargetInfo(layer=layer, role=role, name=self.module_name(layer, role),
                                      out_features=out_features, in_features=in_features,
                                      bias=getattr(mod, "bias", None) is not None))
        return out


class LayoutAdapter(ArchitectureAdapter):
    """Standard layouts, recognised by what their blocks contain (see the module docstring)."""

    def _discover(self, model: nn.Module) -> list[Layer]:
        layers: list[Layer] = []
        stacks: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
                continue
            if any(name.startswith(s + ".") for s in stacks):
                continue  # a list inside a block (T5's per-block ``layer`` list): part of that block
            found = [block_roles(block) for block in module]
            if all(roles is not None for roles in found):
                stacks.append(name)
                layers += [Layer(f"{name}.{i}", block, roles)  # type: ignore[arg-type]
                           for i, (block, roles) in enumerate(zip(module, found, strict=True))]
        return layers


class GenericAdapter(ArchitectureAdapter):
    """Any model: the blocks are the longest ModuleList of identical modules; roles are the projections' paths.

    This is what makes an unknown layout work without new code: roles are the relative names inside a block
    (e.g. ``self_attn.k_proj``, ``fc1``). A role counts as attention if its name mentions attention.
    """

    def _discover(self, model: nn.Module) -> list[Layer]:
        best: tuple[str, nn.ModuleList] | None = None
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(m) for m in module}) != 1 or not any(True for _ in projections(module[0])):
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
        if best is None:
            raise PlanError(f"{type(model).__name__}: found no list of blocks with nn.Linear layers")
        path, blocks = best
        roles = {p: p for p, _ in projections(blocks[0])}
        return [Layer(f"{path}.{i}", block, roles) for i, block in enumerate(blocks)]


def _stacks_of(layers: list[Layer]) -> tuple[tuple[str, int], ...]:
    stacks: dict[str, int] = {}
    for i, layer in enumerate(layers):
        stacks.setdefault(layer.path.rpartition(".")[0], i)
    return tuple(stacks.items())


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        if module is None:
            return None
        module = getattr(module, part, None) if not part.isdigit() else module[int(part)]  # type: ignore[index]
    return module


_REGISTRY: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    """Class decorator / function: make a hand-written adapter the one used for its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The model's adapter: a registered one for its ``config.model_type``, else by structure (standard layout,
    then the generic fallback)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    registered: Callable[[nn.Module], ArchitectureAdapter] | None = _REGISTRY.get(model_type or "")
    if registered is not None:
        return registered(model)
    try:
        return LayoutAdapter(model)
    except PlanError:
        return GenericAdapter(model)


def registered_model_types() -> Iterator[str]:
    return iter(sorted(_REGISTRY))

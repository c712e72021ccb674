"""Architecture adapters: a model family's modules in the paper's vocabulary.

An adapter says where a model's blocks are (indexed 0..L-1) and which ``nn.Linear`` plays each *role*
in a block (``q, k, v, o, gate, up, down`` for Llama-style decoders; ``q, k, v, o, up, down`` for the
BERT family). Everything else in rankwise (plans, decomposition, accounting) speaks in (layer, role) and
asks the adapter for the module, so supporting a new family is a few lines here, and a family with no
adapter still works through :class:`GenericAdapter`, whose roles are the modules' own names.
Adapters are chosen by ``config.model_type`` via :func:`adapter_for`, never by string tests elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from rankwise.errors import PlanError

#: The role groups a plan can name: ``tensors: [attn]`` or ``[mlp]``.
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


class ArchitectureAdapter:
    """Maps one model family onto (layer, role). Subclasses set ``model_types``, ``block_paths``, ``roles``."""

    model_types: tuple[str, ...] = ()
    #: Dotted paths (from the top model) where the ModuleList of blocks may live, tried in order.
    block_paths: tuple[str, ...] = ()
    #: role -> dotted path of the Linear inside one block, in the paper's order.
    role_paths: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks_path, self._blocks = self._find_blocks(model)

    # --- blocks -------------------------------------------------------------------------------------------
    def _find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in self.block_paths:
            module = _get(model, path)
            if isinstance(module, nn.ModuleList):
                return path, module
        raise PlanError(f"{type(self).__name__}: no block list at {', '.join(self.block_paths)}")

    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    def block(self, layer: int) -> nn.Module:
        return self._blocks[layer]

    # --- roles --------------------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.role_paths)

    def role_groups(self) -> dict[str, tuple[str, ...]]:
        """Named groups of roles a plan may use: ``attn``, ``mlp`` and ``all``."""
        attn = tuple(r for r in self.roles if self.is_attention(r))
        mlp = tuple(r for r in self.roles if not self.is_attention(r))
        return {"attn": attn, "mlp": mlp, "all": self.roles}

    def is_attention(self, role: str) -> bool:
        return role in ATTN_ROLES

    def module_name(self, layer: int, role: str) -> str:
        return f"{self.blocks_path}.{layer}.{self.role_paths[role]}"

    def linear(self, layer: int, role: str) -> nn.Module:
        """The module currently at (layer, role): an ``nn.Linear`` or an already-factorized layer."""
        return _get(self.block(layer), self.role_paths[role])

    def replace(self, layer: int, role: str, new: nn.Module) -> nn.Module:
        """Swap the module at (layer, role) through its parent (PEFT-style injection); returns the old one."""
        parent_path, _, attr = self.role_paths[role].rpartition(".")
        parent = _get(self.block(layer), parent_path) if parent_path else self.block(layer)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        return old

    def targets(self) -> list[TargetInfo]:
        """Every (layer, role) of the model with its shape, in layer-major, paper role order."""
        out = []
        for layer in range(self.n_layers):
            for role in self.roles:
                mod = self.linear(layer, role)
                out.append(
                    TargetInfo(
                        layer=layer,
                        role=role,
                        name=self.module_name(layer, role),
                        out_features=int(mod.out_features),
                        in_features=int(mod.in_features),
                        bias=getattr(mod, "bias", None) is not None,
                    )
                )
        return out


class LlamaAdapter(ArchitectureAdapter):
    """Llama and the decoder families that share its module names (Mistral, Qwen2/3, Gemma, GQA models)."""

    model_types = ("llama", "mistral", "mixtral_dense", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                   "smollm3", "granite", "cohere", "starcoder2_llama")
    block_paths = ("model.layers", "model.model.layers", "layers")
    role_paths: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }


class BertAdapter(ArchitectureAdapter):
    """BERT family encoders: query, key, value, attention output, intermediate, output."""

    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    block_paths = ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer")
    role_paths: ClassVar[dict[str, str]] = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    }


class GenericAdapter(ArchitectureAdapter):
    """Any model: the blocks are the longest ModuleList of identical modules; roles are the Linears' names.

    This is what makes a new family work without new code: roles are the relative names inside a block
    (e.g. ``self_attn.k_proj``, ``fc1``). A role counts as attention if its name mentions attention.
    """

    def _find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        best: tuple[str, nn.ModuleList] | None = None
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(m) for m in module}) != 1 or not _linear_names(module[0]):
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
        if best is None:
            raise PlanError(f"{type(model).__name__}: found no list of blocks with nn.Linear layers")
        return best

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.role_paths = {name: name for name in _linear_names(self._blocks[0])}

    def is_attention(self, role: str) -> bool:
        lowered = role.lower()
        return "attn" in lowered or "attention" in lowered or role.rsplit(".", 1)[-1] in ATTN_ROLES


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n]


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        if module is None:
            return None
        module = getattr(module, part, None) if not part.isdigit() else module[int(part)]  # type: ignore[index]
    return module


_REGISTRY: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    """Class decorator / function: make an adapter the one used for its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


for _cls in (LlamaAdapter, BertAdapter):
    register_adapter(_cls)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a model, chosen by ``config.model_type``; the generic fallback when none is registered."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls: Callable[[nn.Module], ArchitectureAdapter] = _REGISTRY.get(model_type or "", GenericAdapter)
    return cls(model)


def registered_model_types() -> Iterator[str]:
    return iter(sorted(_REGISTRY))

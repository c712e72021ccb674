"""Static size accounting: parameters and bytes of a model, by dtype, layer and role, and on disk.

Why a dedicated walk instead of ``sum(p.numel())``: a decomposition report has to say *where* the bytes
are. For a small model like SmolLM2-135M the tied embedding / LM-head matrix (49152 x 576, 28 M
parameters) is a fifth of the model and is never decomposed, so "keep 50% of the decoder linears"
shrinks the model by much less than half. Every parameter is attributed to one role:

* a decomposable target role (``q, k, v, o, gate, up, down`` ...) of a block, found through the
  architecture adapter, so a :class:`~rankwise.layers.FactorizedLinear` counts with its real factor shapes;
* ``embed`` (input embeddings and other embedding tables), ``lm_head`` (output projection), ``norm``
  (normalisation weights), ``other`` (anything else: biases outside targets, poolers, ...).

Tied parameters (the same tensor under two names, e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``)
are counted once, under the first role that owns them, and flagged. Buffers (rotary tables) are excluded.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from rankwise.errors import RankwiseError
from rankwise.fileio import JsonRecord
from rankwise.models.adapters import ArchitectureAdapter, adapter_for


@dataclass(frozen=True)
class ParamRow:
    """One distinct parameter tensor: where it lives, what it is for, how big it is."""

    name: str
    aliases: tuple[str, ...]  # other names of the same tensor (tied weights)
    layer: int | None
    role: str
    numel: int
    dtype: str
    nbytes: int

    @property
    def tied(self) -> bool:
        return bool(self.aliases)


@dataclass(frozen=True)
class TargetRecord(JsonRecord):
    """Which decomposable target a record is about; :meth:`to_dict` writes its shape (and ranks) as lists."""

    layer: int
    role: str
    name: str
    shape: tuple[int, int]  # (out_features, in_features)


@dataclass(frozen=True)
class TargetSize(TargetRecord):
    """One decomposable target as it is now: dense or factorized, with its parameter counts."""

    form: str  # "dense", "three_factor" or "two_factor"
    ranks: tuple[int, int] | None  # (r1, r2) of a factorized layer
    params: int
    dense_params: int  # out*in (+bias): what the dense Linear has
    nbytes: int


@dataclass
class ModelSize:
    """A model's parameters and bytes, whole and broken down (each tensor counted once)."""

    params: int
    nbytes: int
    by_dtype: dict[str, dict[str, int]]
    by_role: dict[str, dict[str, int]]
    by_layer: dict[int, dict[str, int]]
    embeddings: dict[str, int]
    lm_head: dict[str, Any]
    tied_embeddings: bool
    targets: list[TargetSize] = field(default_factory=list)
    rows: list[ParamRow] = field(default_factory=list)

    @property
    def target_params(self) -> int:
        """Parameters of all decomposable targets (the paper's "decoder linears"), as they are now."""
        return sum(t.params for t in self.targets)

    @property
    def target_dense_params(self) -> int:
        return sum(t.dense_params for t in self.targets)

    def to_dict(self, with_rows: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "params": self.params,
            "bytes": self.nbytes,
            "by_dtype": self.by_dtype,
            "by_role": self.by_role,
            "by_layer": {str(k): v for k, v in sorted(self.by_layer.items())},
            "embeddings": self.embeddings,
            "lm_head": self.lm_head,
            "tied_embeddings": self.tied_embeddings,
            "target_params": self.target_params,
            "target_dense_params": self.target_dense_params,
            "targets": [t.to_dict() for t in self.targets],
        }
        if with_rows:
            out["rows"] = [asdict(r) for r in self.rows]
        return out


def _maybe_adapter(model: nn.Module) -> ArchitectureAdapter | None:
    """The model's adapter, or None for a model with no block structure (accounting still works)."""
    try:
        return adapter_for(model)
    except RankwiseError:
        return None


def _module_roles(model: nn.Module, adapter: ArchitectureAdapter | None) -> dict[str, tuple[int | None, str]]:
    """Dotted module name -> (layer, role) for the target modules, embeddings and LM head."""
    roles: dict[str, tuple[int | None, str]] = {}
    if adapter is not None:
        for t in adapter.targets():
            roles[t.name] = (t.layer, t.role)
    names = {id(m): n for n, m in model.named_modules()}
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if emb is not None and id(emb) in names:
        roles.setdefault(names[id(emb)], (None, "embed"))
    if head is not None and id(head) in names:
        roles.setdefault(names[id(head)], (None, "lm_head"))
    return roles


def _layer_of(name: str, adapter: ArchitectureAdapter | None) -> int | None:
    return adapter.layer_of(name) if adapter is not None else None


def _classify(param_name: str, module: nn.Module, roles: dict[str, tuple[int | None, str]],
              adapter: ArchitectureAdapter | None) -> tuple[int | None, str]:
    """(layer, role) of a parameter: the longest owning module with a known role, else by module type."""
    parts = param_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:cut])
        if owner in roles:
            return roles[owner]
    layer = _layer_of(param_name, adapter)
    if isinstance(module, nn.Embedding):
        return layer, "embed"
    if "norm" in type(module).__name__.lower():
        return layer, "norm"
    return layer, "other"


def param_rows(model: nn.Module) -> list[ParamRow]:
    """Every distinct parameter tensor once, with its role; tied names are kept as aliases."""
    adapter = _maybe_adapter(model)
    roles = _module_roles(model, adapter)
    owners: dict[str, nn.Module] = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    seen: dict[int, list[str]] = defaultdict(list)
    tensors: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)].append(name)
        tensors[id(p)] = p
    rows = []
    for key, names in seen.items():
        p = tensors[key]
        # Attribute a tied tensor to the role that *reads all of it* first: the LM head reads every row each
        # step, an embedding lookup reads one; but count it once, under the embedding (where it is stored).
        classified = [(_classify(n, owners[n], roles, adapter), n) for n in names]
        (layer, role), name = classified[0]
        for (lay, rol), n in classified:
            if rol == "embed":
                (layer, role), name = (lay, rol), n
                break
        rows.append(ParamRow(name=name, aliases=tuple(n for n in names if n != name), layer=layer, role=role,
                             numel=p.numel(), dtype=str(p.dtype).removeprefix("torch."),
                             nbytes=p.numel() * p.element_size()))
    return rows


def target_sizes(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> list[TargetSize]:
    """Each decomposable target with its current form and parameter count (factor shapes, not dense)."""
    adapter = adapter if adapter is not None else _maybe_adapter(model)
    if adapter is None:
        return []
    out = []
    for t in adapter.targets():
        module = adapter.linear(t.layer, t.role)
        params = [p for p in module.parameters()]
        n = sum(p.numel() for p in params)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        shape = getattr(module, "shape", None)
        shape = shape.to_dict() if hasattr(shape, "to_dict") else shape
        if isinstance(shape, dict) and "form" in shape:
            form, ranks = str(shape["form"]), (int(shape["rank_out"]), int(shape["rank_in"]))
        else:
            form, ranks = "dense", None
        dense = t.out_features * t.in_features + (t.out_features if t.bias else 0)
        out.append(TargetSize(layer=t.layer, role=t.role, name=t.name, shape=(t.out_features, t.in_features),
                              form=form, ranks=ranks, params=n, dense_params=dense, nbytes=nbytes))
    return out


def _add(table: dict[Any, dict[str, int]], key: Any, row: ParamRow) -> None:
    entry = table.setdefault(key, {"params": 0, "bytes": 0})
    entry["params"] += row.numel
    entry["bytes"] += row.nbytes


def model_size(model: nn.Module) -> ModelSize:
    """Parameters and bytes of ``model`` by dtype, role and layer; embeddings and LM head separately."""
    rows = param_rows(model)
    by_dtype: dict[str, dict[str, int]] = {}
    by_role: dict[str, dict[str, int]] = {}
    by_layer: dict[int, dict[str, int]] = {}
    for row in rows:
        _add(by_dtype, row.dtype, row)
        _add(by_role, row.role, row)
        if row.layer is not None:
            _add(by_layer, row.layer, row)
    emb_rows = [r for r in rows if r.role == "embed"]
    head_rows = [r for r in rows if r.role == "lm_head"]
    head_params = sum(r.numel for r in head_rows)
    head_bytes = sum(r.nbytes for r in head_rows)
    tied = tied_embeddings(model)
    if tied:
        head_weight = model.get_output_embeddings().weight
        head_params, head_bytes = head_weight.numel(), head_weight.numel() * head_weight.element_size()
    return ModelSize(
        params=sum(r.numel for r in rows),
        nbytes=sum(r.nbytes for r in rows),
        by_dtype=by_dtype,
        by_role=by_role,
        by_layer=by_layer,
        embeddings={"params": sum(r.numel for r in emb_rows), "bytes": sum(r.nbytes for r in emb_rows)},
        lm_head={"params": head_params, "bytes": head_bytes, "shared_with_embeddings": tied,
                 "counted_in_total": not tied},
        tied_embeddings=tied,
        targets=target_sizes(model),
        rows=rows,
    )


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the LM head's weight is the very tensor of the input embedding (stored and counted once)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    return emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)


def disk_bytes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes on disk of a model folder: all files, and the ``*.safetensors`` weight files alone."""
    root = Path(folder)
    if not root.is_dir():
        raise RankwiseError(f"{root}: not a folder (disk size needs a checkpoint or model folder)")
    total = weights = files = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            total += size
            files += 1
            if path.suffix == ".safetensors":
                weights += size
    return {"total": total, "weights": weights, "files": files}

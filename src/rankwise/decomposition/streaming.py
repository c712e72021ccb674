"""Streaming decomposition: a safetensors checkpoint decomposed one block at a time, for models larger
than memory.

``rankwise decompose SRC --out DIR --streaming`` (and :func:`stream_decompose`) never builds the whole
model. It builds the architecture on the meta device (no memory), then for each block in turn:

1. reads that block's tensors only (``safe_open``, sharded ``model.safetensors.index.json`` or one file),
   and assigns them into the block (``load_state_dict(assign=True)``);
2. for data-aware methods, runs the calibration set's hidden states through the block, collecting its
   linears' statistics (:mod:`rankwise.calibration.layerwise`; the hidden states live in RAM or a
   memory-mapped file, one block's inputs and outputs at a time);
3. decomposes the block's planned targets with the very code the whole-model path runs
   (:func:`rankwise.surgery._decompose_target`: same methods, ranks, break-even rule and report records);
4. writes the block's tensors (factors and the untouched ones) as one output shard, and frees the block.

The output is the same checkpoint format as the whole-model ``decompose``: factor tensors under their
module names, ``config.json`` with the rankwise ``quantization_config``, the remote-code file, tokenizer
and ``decomposition_report.json``; only the weights are sharded (one shard per block plus one for the
embeddings and head, with ``model.safetensors.index.json``), which every loader reads.

Calibration modes: ``sequential=False`` (default) calibrates every block on the *original* model's hidden
states, i.e. the statistics one-pass calibration collects (the results match the whole-model path);
``sequential=True`` calibrates each block on the hidden states of the already-compressed earlier blocks,
so each block's factors account for the error upstream. Fisher information (FWSVD) needs the loss at the
end of the model and is not available in streaming mode.

Peak memory: one block's weights, its statistics and temporaries, plus the calibration buffers (two N × L
× d hidden-state stores, the embeddings while the calibration inputs are computed); independent of the
number of blocks. ``bench/streaming.py`` measures it.

Errors in a block (NaN weights, a missing tensor) surface when the pass reaches it; everything is written
to a temp folder that is removed on any error, so OUT is either complete or untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise import surgery
from rankwise.calibration.data import CalibrationConfig, calibration_ids
from rankwise.calibration.layerwise import (
    activation_stores,
    calibration_bounds,
    capture_block_inputs,
    run_block,
)
from rankwise.checkpoint.format import MODELING_FILE, REPORT_FILE, is_checkpoint, read_config
from rankwise.checkpoint.io import _normal_permissions
from rankwise.checkpoint.output import (
    CheckpointError,
    check_out_folder,
    clean_leftovers,
    make_temp_folder,
    output_lock,
    replace_folder,
)
from rankwise.decomposition.base import CalibrationStats, get_method
from rankwise.decomposition_report import DecompositionReport, TargetReport
from rankwise.design.plan import DecompSpec, Plan
from rankwise.errors import ModelLoadError, PlanError, RankwiseError, first_line
from rankwise.models.adapters import ArchitectureAdapter, TargetInfo
from rankwise.models.zoo import parse_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --- the source checkpoint ----------------------------------------------------------------------------------
@dataclass
class SafetensorsSource:
    """A safetensors model folder: which file holds each tensor, read lazily by key."""

    folder: Path
    files: dict[str, Path]  # tensor name -> file

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> SafetensorsSource:
        from safetensors import safe_open

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
        index = folder / INDEX_FILE
        files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: unreadable index ({first_line(exc)})") from None
            for key, name in weight_map.items():
                path = folder / name
                if not path.is_file():
                    raise ModelLoadError(f"{index}: shard {name} (holding {key}) is missing")
                files[key] = path
        elif (folder / SINGLE_FILE).is_file():
            path = folder / SINGLE_FILE
            try:
                with safe_open(str(path), framework="pt") as f:
                    files = dict.fromkeys(f.keys(), path)
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
        else:
            raise ModelLoadError(f"{folder}: streaming needs {SINGLE_FILE} or {INDEX_FILE} (safetensors weights)")
        return cls(folder, files)

    def read(self, keys: Iterable[str], dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, cast to ``dtype`` on ``device``; each file is opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in names:
                        t = f.get_tensor(key)
                        out[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            except RankwiseError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{path}: cannot read tensors ({first_line(exc)})") from None
        return out


def source_folder(spec: str | os.PathLike[str]) -> Path:
    """The safetensors folder behind a model spec: a folder, a bundled alias or a ``.gguf`` file (its
    converted cache folder). Hub ids are not streamed (download the folder first)."""
    from rankwise.models.bundled import BUNDLED
    from rankwise.models.zoo import gguf_cache_folder

    bundled = BUNDLED.get(str(spec))
    path = bundled.locate() if bundled is not None else Path(str(spec)).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_cache_folder(path)
    if not path.is_dir():
        raise ModelLoadError(f"--streaming needs a local safetensors model folder (or bundled alias / .gguf); "
                             f"{spec} is not one")
    return path


# --- the meta-device skeleton -------------------------------------------------------------------------------
def build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model's architecture with its parameters on the meta device (no memory) and its buffers (rotary
    frequencies, position ids) real, as the model's constructor computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from rankwise.models.zoo import _auto_classes, _model_kind

    try:
        config = AutoConfig.from_pretrained(folder)
        cls = _auto_classes(_model_kind(config, None))
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"cannot build the architecture of {folder}: {first_line(exc)}") from None
    model.eval()
    model.tie_weights()
    return model


def _to_meta(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Replace every parameter of ``module`` (except under ``skip`` prefixes) by a meta tensor: frees it."""
    for mod_name, mod in module.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                      requires_grad=False)


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict keys transformers would save (tied copies once), as meta/real tensors by name."""
    state = module.state_dict(keep_vars=True)
    tied = set(getattr(module, "all_tied_weights_keys", None) or {}) if _ties(module) else set()
    return {k: v for k, v in state.items() if k not in tied}


def _ties(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


# --- the pass -----------------------------------------------------------------------------------------------
def stream_decompose(source: str | os.PathLike[str], out: str | os.PathLike[str],
                     plan: Plan | Mapping[str, Any] | str | Path, calibration: CalibrationConfig | None = None, *,
                     fold: str | bool | None = None, sequential: bool = False, offload: str = "cpu",
                     device: str = "cpu", dtype: str = "float32", progress: bool = True, overwrite: bool = False,
                     name: str | None = None) -> DecompositionReport:
    """Decompose the safetensors model at ``source`` block by block into a checkpoint at ``out``.

    Same plan, calibration and ``fold`` semantics as :func:`rankwise.decompose`; ``sequential`` calibrates
    each block on the compressed earlier blocks' outputs; ``offload`` keeps the calibration hidden states in
    RAM (``cpu``) or a memory-mapped temp file (``disk``). Returns the report (also written into ``out``).
    """
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    with output_lock(out):
        check_out_folder(out, overwrite)
        clean_leftovers(out)
        return _stream_locked(source, out, plan, calibration, fold, sequential, offload, device, dtype, progress,
                              name, t_start)


def _stream_locked(source: str | os.PathLike[str], out: Path, plan: Plan | Mapping[str, Any] | str | Path,
                   calibration: CalibrationConfig | None, fold: str | bool | None, sequential: bool, offload: str,
                   device: str, dtype: str, progress: bool, name: str | None, t_start: float
                   ) -> DecompositionReport:
    folder = source_folder(source)
    if is_checkpoint(folder):
        raise PlanError(f"{folder} is already a rankwise checkpoint: stream-decompose its dense original instead")
    plan = surgery.as_plan(plan)
    fold_mode = surgery.parse_fold(plan.fold if fold is None else fold)
    torch_dtype = parse_dtype(dtype)
    src = SafetensorsSource.open(folder)
    model = build_skeleton(folder, torch_dtype)
    adapter, chosen = surgery.resolve_targets(model, plan)
    if len(adapter.stacks) != 1:
        raise PlanError(f"streaming supports models with one stack of blocks; {type(model).__name__} has "
                        f"{len(adapter.stacks)} ({', '.join(p for p, _ in adapter.stacks)})")
    methods = {spec.method: get_method(spec.method) for _, spec in chosen}
    request = surgery.stats_request(chosen, methods)
    fisher = sorted(n for n, fields in request.items() if "fisher" in fields)
    if fisher:
        raise PlanError("streaming cannot collect Fisher information (fwsvd needs the loss at the end of the "
                        f"model, e.g. for {fisher[0]}): use the whole-model decompose")
    params_before, bytes_before = surgery.model_size(model)
    blocks_path = adapter.blocks_path
    blocks = model.get_submodule(blocks_path)
    n_layers = adapter.n_layers
    block_keys = {i: [] for i in range(n_layers)}
    stem_keys: list[str] = []
    for key in _meta_state(model):
        layer = adapter.layer_of(key)
        (block_keys[layer] if layer is not None else stem_keys).append(key)
    for key in stem_keys:
        if key not in src.files and not _is_buffer(model, key):
            raise ModelLoadError(f"{folder}: tensor {key} is missing from the checkpoint")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_folder(out)
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {first_line(exc)}") from None
    try:
        records, calib_info, shards = _run(model, adapter, blocks, blocks_path, chosen, methods, request, src,
                                           block_keys, stem_keys, tmp, calibration, fold_mode, sequential,
                                           offload, device, torch_dtype, progress)
        params_after, bytes_after = surgery.model_size(model)
        report = DecompositionReport(
            model=name or str(source), plan=plan.to_dict(), fold=str(fold_mode).lower(), targets=records,
            params_before=params_before, params_after=params_after, bytes_before=bytes_before,
            bytes_after=bytes_after, seconds=time.perf_counter() - t_start, calibration=calib_info,
            dtype=str(torch_dtype).removeprefix("torch."))
        _write_index(tmp, shards)
        _write_metadata(model, folder, tmp, report)
        _normal_permissions(tmp)
        replace_folder(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out}: {first_line(exc)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _is_buffer(model: nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())


def _run(model: nn.Module, adapter: ArchitectureAdapter, blocks: nn.Module, blocks_path: str,
         chosen: list[tuple[TargetInfo, DecompSpec]], methods: Mapping[str, Any],
         request: Mapping[str, frozenset[str]], src: SafetensorsSource, block_keys: dict[int, list[str]],
         stem_keys: list[str], tmp: Path, calibration: CalibrationConfig | None, fold_mode: str | bool,
         sequential: bool, offload: str, device: str, dtype: torch.dtype, progress: bool
         ) -> tuple[list[TargetReport], dict[str, Any] | None, dict[str, dict[str, int]]]:
    """The block loop; returns the target records, the calibration record and shard -> {key: bytes}."""
    n_layers = adapter.n_layers
    n_shards = n_layers + 1
    shard_name = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    shards: dict[str, dict[str, int]] = {}
    by_layer: dict[int, list[tuple[TargetInfo, DecompSpec]]] = {}
    for info, spec in chosen:
        by_layer.setdefault(info.layer, []).append((info, spec))
    calibrated = sorted({info.layer for info, _ in chosen if info.name in request})
    last_calibrated = calibrated[-1] if calibrated else -1
    records: list[TargetReport] = []

    # the stem (embeddings, final norm, head): copied as is, in the model dtype
    stem = src.read([k for k in stem_keys if k in src.files], dtype)
    shards[shard_name[0]] = _save_shard(tmp / shard_name[0], stem)
    calib_info: dict[str, Any] | None = None
    stores = None
    calib_ctx = None
    t_calib = 0.0
    if last_calibrated >= 0:
        config = calibration or CalibrationConfig()
        ids = calibration_ids(_tokenizer(src.folder), config, surgery._max_length(model))
        bounds = calibration_bounds(int(ids.shape[0]), config.batch_size)
        hidden = int(getattr(model.config, "hidden_size", 0) or 0)
        types = set(getattr(model.config, "layer_types", None) or [])
        if len(types) > 1:
            raise PlanError(f"streaming calibration: the model's blocks use different attention masks "
                            f"({', '.join(sorted(map(str, types)))}); use the whole-model decompose")
        t0 = time.perf_counter()
        calib_ctx = activation_stores((int(ids.shape[0]), int(ids.shape[1]), hidden), dtype, offload,
                                      folder=tmp)
        stores = calib_ctx.__enter__()
        stem_assign = {k: v.to(device) for k, v in stem.items()}
        model.load_state_dict(stem_assign, strict=False, assign=True)
        del stem_assign
        if device != "cpu":
            model.to(device)  # the stem's buffers (rotary frequencies); the blocks are still on the meta device
        with surgery._bar(progress, "calibration inputs", total=len(bounds) - 1) as update:
            kwargs = capture_block_inputs(model, blocks, ids, bounds, stores[0], device, {"use_cache": False})
            update(len(bounds) - 1, len(bounds) - 1)
        _to_meta(model, skip=(blocks_path,))
        t_calib += time.perf_counter() - t0
        calib_info = {"source": "streaming (block by block)", "mode": "sequential" if sequential else "one-pass",
                      "offload": offload, "n_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                      "n_tokens": int(ids.numel()), "cache_hit": False, **config.describe()}
    del stem
    try:
        with surgery._bar(progress, "decompose (streaming)", total=n_layers) as update:
            for layer in range(n_layers):
                block = blocks[layer]
                prefix = f"{blocks_path}.{layer}."
                tensors = src.read(block_keys[layer], dtype, device)
                missing = sorted(k for k in block_keys[layer] if k not in tensors)
                if missing:
                    raise ModelLoadError(f"{src.folder}: tensor {missing[0]} is missing from the checkpoint")
                block.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=False, assign=True)
                block.to(device)
                del tensors
                targets = by_layer.get(layer, [])
                surgery.check_weights(adapter, targets)
                stats: dict[str, CalibrationStats] = {}
                needs_forward = stores is not None and layer < last_calibrated
                if stores is not None and layer <= last_calibrated:
                    rel = {name[len(prefix):]: fields for name, fields in request.items() if name.startswith(prefix)}
                    t0 = time.perf_counter()
                    if sequential:
                        got = run_block(block, stores[0], None, kwargs, bounds, device, rel) if rel else {}
                    else:
                        got = run_block(block, stores[0], stores[1] if needs_forward else None, kwargs, bounds,
                                        device, rel)
                    t_calib += time.perf_counter() - t0
                    stats = {prefix + k: v for k, v in got.items()}
                for info, spec in targets:
                    st = stats.pop(info.name, None)
                    records.append(surgery._decompose_target(adapter, info, spec, methods[spec.method], st,
                                                             fold_mode))
                    del st
                stats.clear()
                if stores is not None and needs_forward:
                    if sequential:
                        t0 = time.perf_counter()
                        run_block(block, stores[0], stores[1], kwargs, bounds, device)
                        t_calib += time.perf_counter() - t0
                    stores = (stores[1], stores[0])
                state = {prefix + k: v for k, v in block.state_dict().items()}
                shards[shard_name[layer + 1]] = _save_shard(tmp / shard_name[layer + 1], state)
                del state
                _to_meta(block)
                update(layer + 1, n_layers)
    finally:
        if calib_ctx is not None:
            calib_ctx.__exit__(None, None, None)
    if calib_info is not None:
        calib_info["seconds"] = t_calib
    return records, calib_info, shards


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    from rankwise.models.zoo import MissingTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        return MissingTokenizer(str(folder), f"cannot load it: {first_line(exc)}")


def _save_shard(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Write one safetensors shard (CPU, contiguous, as save_pretrained does); returns key -> bytes."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata={"format": "pt"})
    return {k: v.numel() * v.element_size() for k, v in data.items()}


def _write_index(tmp: Path, shards: Mapping[str, Mapping[str, int]]) -> None:
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    total = sum(n for keys in shards.values() for n in keys.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_metadata(model: nn.Module, folder: Path, tmp: Path, report: DecompositionReport) -> None:
    """config.json (with the rankwise quantization_config), generation config, remote-code file, tokenizer
    and report: the same files :func:`rankwise.checkpoint.save` writes next to the weights."""
    from transformers import GenerationConfig

    from rankwise.checkpoint.io import auto_class_for, base_architecture, modeling_source, quantization_config

    model.config.save_pretrained(tmp)
    config = read_config(tmp) or {}
    config["quantization_config"] = quantization_config(model, report.plan)
    config.pop("auto_map", None)
    arch = base_architecture(model)
    if arch is not None:
        config["architectures"] = [arch]
        auto = auto_class_for(arch)
        if auto is not None:
            (tmp / MODELING_FILE).write_text(modeling_source(arch))
            config["auto_map"] = {auto: f"{MODELING_FILE.removesuffix('.py')}.Rankwise{arch}"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (folder / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(folder).save_pretrained(tmp)
    tokenizer = _tokenizer(folder)
    if tokenizer:
        tokenizer.save_pretrained(tmp)
    (tmp / REPORT_FILE).write_text(report.to_json() + "\n")


def block_bytes(model_folder: str | os.PathLike[str], layer: int = 0, dtype: str = "float32") -> int:
    """Bytes of one block's tensors in ``dtype`` (for memory budgets and the streaming benchmark)."""
    folder = source_folder(model_folder)
    model = build_skeleton(folder, parse_dtype(dtype))
    from rankwise.models.adapters import adapter_for

    adapter = adapter_for(model)
    block = adapter.block(layer)
    return sum(p.numel() * p.element_size() for p in block.parameters())


__all__ = ["SafetensorsSource", "block_bytes", "build_skeleton", "source_folder", "stream_decompose"]

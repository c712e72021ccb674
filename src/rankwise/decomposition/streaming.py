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
   (:func:`rankwise.decomposition.apply._decompose_target`: same methods, ranks, break-even rule and report records);
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

import contextlib
import functools
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.calibration.data import CalibrationConfig, calibration_ids
from rankwise.calibration.layerwise import (
    activation_stores,
    calibration_bounds,
    capture_block_inputs,
    run_block,
)
from rankwise.checkpoint.format import is_checkpoint, read_config
from rankwise.checkpoint.output import (
    atomic_folder,
    check_out_folder,
    clean_leftovers,
    output_lock,
)
from rankwise.decomposition import apply as surgery
from rankwise.decomposition.base import CalibrationStats, get_method
from rankwise.decomposition.report import DecompositionReport, TargetReport
from rankwise.design.plan import DecompSpec, Plan
from rankwise.errors import ModelLoadError, PlanError, first_line
from rankwise.fileio import libc
from rankwise.models.adapters import ArchitectureAdapter, TargetInfo, adapter_for
from rankwise.models.zoo import TOKENIZER_DEFINITION_FILES, parse_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --- the source checkpoint ----------------------------------------------------------------------------------
#: safetensors dtype names -> torch dtypes (the format's header names them so).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
}

_ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header: name -> {dtype, shape, data_offsets}.

    Why not ``safe_open``: it memory-maps the whole file copy-on-write, which counts as process data memory
    (``RLIMIT_DATA``) and fails for a file larger than the limit; plain reads of one tensor's bytes do not.
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a readable safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if not (isinstance(entry, dict) and entry.get("dtype") in _ST_DTYPES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)):
            raise ModelLoadError(f"{path}: tensor {key} has an unreadable header entry")
    return {k: v for k, v in header.items()}


@dataclass
class SafetensorsSource:
    """A safetensors model folder: which file holds each tensor, each tensor read on its own by byte range."""

    folder: Path
    files: dict[str, Path]  # tensor name -> file
    entries: dict[str, dict[str, Any]]  # tensor name -> header entry

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> SafetensorsSource:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelLoadError(f"{index}: unreadable index ({first_line(exc)})") from None
        elif (folder / SINGLE_FILE).is_file():
            names = [SINGLE_FILE]
        else:
            raise ModelLoadError(f"{folder}: streaming needs {SINGLE_FILE} or {INDEX_FILE} (safetensors weights)")
        files: dict[str, Path] = {}
        entries: dict[str, dict[str, Any]] = {}
        for name in names:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"{folder}: shard {name} named by {INDEX_FILE} is missing")
            for key, entry in read_header(path).items():
                files[key], entries[key] = path, entry
        return cls(folder, files, entries)

    def read(self, keys: Iterable[str], dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype``) on ``device``; only their bytes are read."""
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            path, entry = self.files[key], self.entries[key]
            begin, end = (int(x) for x in entry["data_offsets"])
            t = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
            nbytes = t.numel() * t.element_size()
            if end - begin != nbytes:
                raise ModelLoadError(f"{path}: tensor {key} has {end - begin} bytes for shape {entry['shape']}")
            try:
                with open(path, "rb") as f:
                    f.seek(8 + _header_len(path) + begin)
                    got = f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else bytearray())
            except OSError as exc:
                raise ModelLoadError(f"{path}: cannot read tensor {key} ({first_line(exc)})") from None
            if nbytes and got != nbytes:
                raise ModelLoadError(f"{path}: truncated file (tensor {key})")
            out[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        return out

    def _span(self, key: str) -> tuple[Path, int, torch.dtype, list[int]]:
        """(file, absolute offset of the tensor's first byte, stored dtype, shape)."""
        path, entry = self.files[key], self.entries[key]
        return path, 8 + _header_len(path) + int(entry["data_offsets"][0]), _ST_DTYPES[entry["dtype"]], entry["shape"]

    def read_rows(self, key: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` of the 2-D tensor ``key`` (in ``dtype``), reading only their bytes: the calibration
        set's embedding rows instead of the whole vocabulary."""
        path, start, stored, shape = self._span(key)
        if len(shape) != 2:
            raise ModelLoadError(f"{path}: tensor {key} is not 2-D (shape {shape})")
        out = torch.empty((len(rows), shape[1]), dtype=stored)
        row_bytes = shape[1] * out.element_size()
        view = out.view(torch.uint8).numpy()
        try:
            with open(path, "rb") as f:
                for i, r in enumerate(rows.tolist()):
                    if not 0 <= r < shape[0]:
                        raise ModelLoadError(f"{path}: token id {r} is outside {key}'s {shape[0]} rows")
                    f.seek(start + r * row_bytes)
                    if f.readinto(memoryview(view[i])) != row_bytes:
                        raise ModelLoadError(f"{path}: truncated file (tensor {key})")
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read tensor {key} ({first_line(exc)})") from None
        return out.to(dtype) if out.is_floating_point() else out

    def copy_to_shard(self, keys: Iterable[str], dest: Path, dtype: torch.dtype,
                      chunk_bytes: int = 8 << 20) -> dict[str, int]:
        """Write the named tensors (floating ones cast to ``dtype``) as one safetensors file, a chunk at a time;
        returns key -> bytes written.

        Why not ``safetensors.save_file``: it needs every tensor in memory at once, and the stem (embeddings,
        head) is the largest thing a small model has (SmolLM2: 108 MiB, 7.5 blocks): copied in chunks, the
        streaming peak stays one block plus calibration buffers."""
        specs: list[tuple[str, torch.dtype, list[int]]] = []
        for key in keys:
            _, _, stored, shape = self._span(key)
            specs.append((key, dtype if stored.is_floating_point else stored, shape))

        def write(key: str, out_dtype: torch.dtype, out: Any) -> None:
            self._copy_tensor(key, out, out_dtype, chunk_bytes)

        return write_safetensors(dest, specs, write)

    def _copy_tensor(self, key: str, out: Any, out_dtype: torch.dtype, chunk_bytes: int) -> None:
        path, start, stored, shape = self._span(key)
        size = stored.itemsize
        total = math.prod(shape) * size
        step = max(size, chunk_bytes // size * size)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                done = 0
                while done < total:
                    data = f.read(min(step, total - done))
                    if not data:
                        raise ModelLoadError(f"{path}: truncated file (tensor {key})")
                    done += len(data)
                    if out_dtype != stored:
                        data = torch.frombuffer(bytearray(data), dtype=stored).to(out_dtype).view(torch.uint8).numpy()
                    out.write(data)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read tensor {key} ({first_line(exc)})") from None


def write_safetensors(dest: Path, specs: Iterable[tuple[str, torch.dtype, list[int]]],
                      write_data: Callable[[str, torch.dtype, Any], None]) -> dict[str, int]:
    """Write a safetensors file of the tensors ``specs`` (key, dtype, shape), whose bytes
    ``write_data(key, dtype, file)`` writes; returns key -> bytes.

    The layout is ``save_file``'s: an 8-byte little-endian header length, the JSON header padded with spaces
    to 8 bytes, then the data, largest element size first, so every tensor starts at a multiple of its
    element size (readers that map the file and view it in place need that). Each tensor's byte count is
    checked as it is written: a short or long write is an error, never a corrupt file."""
    ordered = sorted(specs, key=lambda spec: (-spec[1].itemsize, spec[0]))
    keys = [key for key, _, _ in ordered]
    if len(set(keys)) != len(keys):
        raise ModelLoadError(f"{dest.name}: a tensor name is given twice")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    sizes: dict[str, int] = {}
    offset = 0
    for key, out_dtype, shape in ordered:
        if out_dtype not in _ST_NAMES:
            raise ModelLoadError(f"tensor {key}: dtype {str(out_dtype).removeprefix('torch.')} cannot be stored in "
                                 "safetensors")
        n = math.prod(shape) * out_dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[out_dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes[key] = n
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dest, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        start = out.tell()
        for key, out_dtype, _ in ordered:
            begin, end = header[key]["data_offsets"]
            write_data(key, out_dtype, out)
            written = out.tell() - start - begin
            if written != end - begin:
                raise ModelLoadError(f"{dest.name}: tensor {key} was written with {written} bytes, not {end - begin}")
    return sizes


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


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
    frequencies, position ids) real, as the model's constructor computes them.

    Built under ``torch.device("meta")``: nothing is allocated, not even transiently (building on the CPU
    and moving each parameter to meta, as ``init_empty_weights`` does, leaves the process's heap as large
    as the whole model). The buffers come from a one-block, tiny-vocabulary copy built on the CPU.
    """
    from transformers import AutoConfig

    from rankwise.models.zoo import _auto_classes, _model_kind

    try:
        config = AutoConfig.from_pretrained(folder)
        cls = _auto_classes(_model_kind(config, None))
        with torch.device("meta"):
            model = cls.from_config(config, dtype=dtype)
        tiny = cls.from_config(_tiny_config(config), dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"cannot build the architecture of {folder}: {first_line(exc)}") from None
    _copy_buffers(tiny, model)
    model.eval()
    model.tie_weights()
    return model


def _tiny_config(config: Any) -> Any:
    """The same architecture with one block and a 16-token vocabulary (for its buffers, which need neither)."""
    import copy

    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:1]
    if isinstance(getattr(small, "vocab_size", None), int):
        small.vocab_size = 16
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(small, key, None)
            if isinstance(value, int) and value >= 16:
                setattr(small, key, None)
    return small


def _copy_buffers(tiny: nn.Module, model: nn.Module) -> None:
    """Give ``model`` (on meta) the real buffers of ``tiny``: same names outside the blocks, block 0's for
    every block."""
    adapter = adapter_for(tiny)
    block_prefix = adapter.blocks_path + "."
    for name, buf in tiny.named_buffers():
        if name.startswith(block_prefix):
            rest = name[len(block_prefix):].split(".", 1)[1]
            targets = [f"{block_prefix}{i}.{rest}" for i in range(len(model.get_submodule(adapter.blocks_path)))]
        else:
            targets = [name]
        for target in targets:
            owner_name, _, attr = target.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            old = owner._buffers.get(attr)
            if old is not None and tuple(old.shape) == tuple(buf.shape):
                owner._buffers[attr] = buf.clone()


def release_freed_memory() -> None:
    """Make glibc return freed tensor memory to the OS at once (a fixed 64 KiB mmap threshold).

    Why: glibc raises its mmap threshold each time a large block is freed, after which blocks of that size
    come from the heap, and a heap fragmented by a block's worth of tensors per step only grows: the
    process would keep about 10 MB per block streamed (measured) although no tensor is alive. With a fixed
    threshold every tensor above 64 KiB is its own mapping, unmapped when freed. Why as low as 64 KiB: a
    calibration batch's activations (0.5-1.2 MiB for 4 x 64 tokens of SmolLM2) came from the heap at a
    1 MiB threshold, and when a longer-lived allocation landed above them the heap could not shrink: in
    half the runs the heap's span (what ``RLIMIT_DATA`` counts) grew ~2 MiB a block, 430 -> 600-730 MiB
    over 150 blocks; at 64 KiB it stayed at 424-431 MiB in every run, in the same time. Process-wide
    (glibc has no getter to restore the old setting); no effect off glibc."""
    with contextlib.suppress(AttributeError, TypeError):
        libc().mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def trim_heap(collect: bool = True) -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): after the tokenizer, after each
    block's calibration forward and after each block, whose many small native allocations (below the mmap
    threshold) would otherwise stay in the heap as free but resident memory, under the next step's arrays
    (measured: 5-10 MiB of a SmolLM2 block's peak). ``collect`` first frees objects held only by reference
    cycles (the tokenizer's). No effect off glibc."""
    if collect:
        gc.collect()  # objects in reference cycles (a tokenizer's) hold native memory until collected
    with contextlib.suppress(AttributeError, TypeError):
        libc().malloc_trim(0)


def _buffers_to(model: nn.Module, device: str) -> None:
    """Move every real buffer to ``device`` (``Module.to`` would fail on the meta parameters)."""
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                mod._buffers[name] = buf.to(device)


def _to_meta(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Replace every parameter of ``module`` (except under ``skip`` prefixes) by a meta tensor: frees it.

    A parameter shared by several modules (tied embeddings) stays shared, so sizes count it once."""
    memo: dict[int, nn.Parameter] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        if any(mod_name == s or mod_name.startswith(s + ".") for s in skip):
            continue
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                               requires_grad=False)
                mod._parameters[pname] = memo[id(p)]


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
                     plan: Plan | Mapping[str, Any] | str | Path, calibration: CalibrationConfig | torch.Tensor | None = None, *,
                     fold: str | bool | None = None, sequential: bool = False, offload: str = "cpu",
                     device: str = "cpu", dtype: str = "float32", progress: bool = True, overwrite: bool = False,
                     name: str | None = None) -> DecompositionReport:
    """Decompose the safetensors model at ``source`` block by block into a checkpoint at ``out``.

    Same plan and ``fold`` semantics as :func:`rankwise.decompose`; ``calibration`` is a
    :class:`CalibrationConfig` (text from the source folder's tokenizer) or an N × L tensor of token ids;
    ``device`` is where blocks are computed and decomposed (``cpu``, ``cuda``); ``sequential`` calibrates
    each block on the compressed earlier blocks' outputs; ``offload`` keeps the calibration hidden states in
    RAM (``cpu``) or a memory-mapped temp file (``disk``). Returns the report (also written into ``out``).
    """
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    if offload not in ("cpu", "disk"):
        raise PlanError(f"--offload: {offload!r} must be cpu or disk")
    release_freed_memory()
    with output_lock(out):
        check_out_folder(out, overwrite)
        clean_leftovers(out)
        return _stream_locked(source, out, plan, calibration, fold, sequential, offload, device, dtype, progress,
                              name, t_start)


def _stream_locked(source: str | os.PathLike[str], out: Path, plan: Plan | Mapping[str, Any] | str | Path,
                   calibration: CalibrationConfig | torch.Tensor | None, fold: str | bool | None, sequential: bool, offload: str,
                   device: str, dtype: str, progress: bool, name: str | None, t_start: float
                   ) -> DecompositionReport:
    folder = source_folder(source)
    if is_checkpoint(folder):
        raise PlanError(f"{folder} is already a rankwise checkpoint: stream-decompose its dense original instead")
    plan = surgery.as_plan(plan)
    fold_mode = surgery.parse_fold(plan.fold if fold is None else fold)
    torch_dtype = parse_dtype(dtype or "float32")  # the source is never a rankwise checkpoint: float32 unless asked
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
    check_source(model, src)

    with atomic_folder(out) as tmp:
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
    return report


def check_source(model: nn.Module, src: SafetensorsSource) -> None:
    """Every tensor the architecture needs is in the checkpoint with its shape, and nothing else is: checked
    from the headers before any work, so a broken checkpoint never yields random or half-written weights."""
    expected = _meta_state(model)
    everything = model.state_dict(keep_vars=True)  # tied copies included: a checkpoint may store them
    buffers = {name for name, _ in model.named_buffers()}

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = sorted(k for k in expected if k not in src.files and k not in buffers)
    if missing:
        raise ModelLoadError(f"{src.folder}: tensor(s) missing from the checkpoint: {some(missing)}")
    unexpected = sorted(k for k in src.files if k not in everything)
    if unexpected:
        raise ModelLoadError(f"{src.folder}: tensor(s) the {type(model).__name__} architecture does not have: "
                             f"{some(unexpected)}")
    for key, tensor in expected.items():
        entry = src.entries.get(key)
        if entry is not None and tuple(entry["shape"]) != tuple(tensor.shape):
            raise ModelLoadError(f"{src.folder}: tensor {key} has shape {tuple(entry['shape'])}, the architecture "
                                 f"needs {tuple(tensor.shape)}")


def _run(model: nn.Module, adapter: ArchitectureAdapter, blocks: nn.Module, blocks_path: str,
         chosen: list[tuple[TargetInfo, DecompSpec]], methods: Mapping[str, Any],
         request: Mapping[str, frozenset[str]], src: SafetensorsSource, block_keys: dict[int, list[str]],
         stem_keys: list[str], tmp: Path, calibration: CalibrationConfig | torch.Tensor | None, fold_mode: str | bool,
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

    calib_info: dict[str, Any] | None = None
    stores = None
    t_calib = 0.0
    if last_calibrated >= 0:  # tokenized before the embeddings are read: the two peaks do not add up
        config = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig()
        if isinstance(calibration, torch.Tensor):
            ids = calibration.to(torch.int64)
        else:
            ids = calibration_ids(_tokenizer(src.folder), config, surgery._max_length(model))
            trim_heap()  # the tokenizer is gone: its vocabulary's and its work's pages go back to the OS
    # the stem (embeddings, final norm, head): copied as is, in the model dtype, a chunk at a time
    present = [k for k in stem_keys if k in src.files]
    shards[shard_name[0]] = src.copy_to_shard(present, tmp / shard_name[0], dtype)
    with contextlib.ExitStack() as cleanup:
        if last_calibrated >= 0:
            bounds = calibration_bounds(int(ids.shape[0]), config.batch_size)
            hidden = int(getattr(model.config, "hidden_size", 0) or 0)
            types = set(getattr(model.config, "layer_types", None) or [])
            if len(types) > 1:
                raise PlanError(f"streaming calibration: the model's blocks use different attention masks "
                                f"({', '.join(sorted(map(str, types)))}); use the whole-model decompose")
            t0 = time.perf_counter()
            stores = cleanup.enter_context(activation_stores((int(ids.shape[0]), int(ids.shape[1]), hidden), dtype,
                                                             offload, folder=tmp))
            embedding = model.get_input_embeddings()
            emb_key, head_keys = _embedding_keys(model, embedding)
            stem = src.read([k for k in present if k != emb_key and k not in head_keys], dtype, device)
            model.load_state_dict(stem, strict=False, assign=True)
            del stem
            _buffers_to(model, device)  # rotary frequencies, position ids (parameters of blocks are still on meta)
            with surgery._bar(progress, "calibration inputs", total=len(bounds) - 1) as update, \
                    _embedding_rows(embedding, src, emb_key, ids, dtype, device):
                kwargs = capture_block_inputs(model, blocks, ids, bounds, stores[0], device, {"use_cache": False})
                update(len(bounds) - 1, len(bounds) - 1)
            _to_meta(model, skip=(blocks_path,))
            t_calib += time.perf_counter() - t0
            calib_info = {"source": "streaming (block by block)", "mode": "sequential" if sequential else "one-pass",
                          "offload": offload, "n_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                          "n_tokens": int(ids.numel()), "cache_hit": False,
                          **(config.describe() if not isinstance(calibration, torch.Tensor)
                             else {"source": "token ids given by the caller (streaming, block by block)"})}
        with surgery._bar(progress, "decompose (streaming)", total=n_layers) as update:
            for layer in range(n_layers):
                block = blocks[layer]
                prefix = f"{blocks_path}.{layer}."
                tensors = src.read(block_keys[layer], dtype, device)
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
                    trim_heap(collect=False)  # the forward's freed pages, before the decomposition's arrays
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
                trim_heap(collect=False)
                update(layer + 1, n_layers)
    if calib_info is not None:
        calib_info["seconds"] = t_calib
    return records, calib_info, shards


def _embedding_keys(model: nn.Module, embedding: nn.Module) -> tuple[str, set[str]]:
    """The checkpoint key of the input embedding's weight, and those of the output head (never run while the
    block inputs are captured: the forward stops at block 0, so the head is not read)."""
    names = {id(p): [] for p in model.parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    emb = names[id(embedding.weight)]
    head = model.get_output_embeddings()
    head_keys = set(names.get(id(head.weight), [])) if head is not None and hasattr(head, "weight") else set()
    return emb[0], head_keys - set(emb[:1])


@contextlib.contextmanager
def _embedding_rows(embedding: nn.Module, src: SafetensorsSource, key: str, ids: torch.Tensor, dtype: torch.dtype,
                    device: str) -> Any:
    """Give ``embedding`` only the rows of the token ids in ``ids`` (their ids renumbered on the way in by a
    pre-hook), so the vocabulary never has to be in memory; the model sees its original ids everywhere else
    (models that derive positions or masks from ids are unaffected). Restored on exit."""
    vocab = torch.unique(ids)
    rows = src.read_rows(key, vocab, dtype).to(device)
    original, padding = embedding.weight, getattr(embedding, "padding_idx", None)
    lookup = vocab.to(device)

    def renumber(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (torch.searchsorted(lookup, args[0]), *args[1:]), kwargs
        name = next(iter(kwargs))
        return args, {**kwargs, name: torch.searchsorted(lookup, kwargs[name])}

    embedding.weight = nn.Parameter(rows, requires_grad=False)
    if padding is not None:
        embedding.padding_idx = None  # a row number of the full table; only gradients use it
    handle = embedding.register_forward_pre_hook(renumber, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        embedding.weight = original
        if padding is not None:
            embedding.padding_idx = padding


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    from rankwise.models.zoo import MissingTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        return MissingTokenizer(str(folder), f"cannot load it: {first_line(exc)}")


def _save_shard(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Write one safetensors shard; returns key -> bytes. Each tensor's bytes go to the file from its own
    memory (``save_file`` first copies every tensor to a bytes object and holds them all: a second copy of
    the block in memory)."""
    def write(key: str, dtype: torch.dtype, out: Any) -> None:
        t = tensors[key].detach().to("cpu").contiguous()
        if t.numel():
            out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    return write_safetensors(path, [(k, v.dtype, list(v.shape)) for k, v in tensors.items()], write)


def _write_index(tmp: Path, shards: Mapping[str, Mapping[str, int]]) -> None:
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    total = sum(n for keys in shards.values() for n in keys.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_metadata(model: nn.Module, folder: Path, tmp: Path, report: DecompositionReport) -> None:
    """config.json (with the rankwise quantization_config), generation config, remote-code file, tokenizer
    and report: the same files :func:`rankwise.checkpoint.save` writes next to the weights."""
    from transformers import GenerationConfig

    from rankwise.checkpoint.io import write_rankwise_files

    model.config.save_pretrained(tmp)
    if (folder / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(folder).save_pretrained(tmp)
    write_rankwise_files(model, tmp, report.plan, TokenizerFiles(folder), report)


#: Files copied as a tokenizer: those that make a folder have one (the zoo's list), more vocabulary files
#: some families use, and the companions ``save_pretrained`` writes; a folder's own tokenizer class adds its
#: ``vocab_files_names``.
TOKENIZER_FILES = (*TOKENIZER_DEFINITION_FILES, "spm.model", "source.spm", "target.spm", "bpe.codes",
                   "tekken.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
#: Folders of tokenizer files (extra chat templates).
TOKENIZER_FOLDERS = ("additional_chat_templates",)


@dataclass(frozen=True)
class TokenizerFiles:
    """A source folder's tokenizer, saved by copying its files as they are: loading it to save it would
    cost more memory than a block of a small model (transformers' tokenizer peaks near 60 MiB for SmolLM2),
    at the end of the pass. Which files: the usual names plus those the class named in
    ``tokenizer_config.json`` declares (its ``vocab_files_names``; the class is imported, no vocabulary is
    read). Falsy when the folder has none, as :class:`~rankwise.models.zoo.MissingTokenizer` is."""

    folder: Path

    @functools.cached_property
    def names(self) -> set[str]:
        names = set(TOKENIZER_FILES)
        try:
            config = json.loads((self.folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            config = None
        class_name = config.get("tokenizer_class") if isinstance(config, dict) else None
        if isinstance(class_name, str):
            from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

            with contextlib.suppress(Exception):  # an unknown or unimportable class adds nothing
                cls = tokenizer_class_from_name(class_name)
                names |= {n for n in (getattr(cls, "vocab_files_names", None) or {}).values() if isinstance(n, str)}
        return names

    @functools.cached_property
    def files(self) -> list[Path]:
        """Read once: ``write_rankwise_files`` asks whether there are any, then copies them."""
        return sorted(self.folder / n for n in self.names if (self.folder / n).is_file())

    def __bool__(self) -> bool:
        return bool(self.files)

    def save_pretrained(self, dest: str | os.PathLike[str]) -> tuple[str, ...]:
        copied = [str(shutil.copyfile(f, Path(dest) / f.name)) for f in self.files]
        for name in TOKENIZER_FOLDERS:
            if (self.folder / name).is_dir():
                copied.append(str(shutil.copytree(self.folder / name, Path(dest) / name)))
        return tuple(copied)


def block_bytes(model_folder: str | os.PathLike[str], layer: int = 0, dtype: str = "float32") -> int:
    """Bytes of one block's tensors in ``dtype`` (for memory budgets and the streaming benchmark)."""
    folder = source_folder(model_folder)
    model = build_skeleton(folder, parse_dtype(dtype))
    adapter = adapter_for(model)
    block = adapter.block(layer)
    return sum(p.numel() * p.element_size() for p in block.parameters())


def repeat_blocks(source: str | os.PathLike[str], out: str | os.PathLike[str], n_layers: int,
                  blocks_per_shard: int = 16) -> Path:
    """Write a deeper copy of a model: its blocks repeated (block i is block i mod L of ``source``) until it
    has ``n_layers``, sharded, one shard's blocks in memory at a time. A model larger than memory out of a
    small one, for the streaming memory test and benchmark (the weights are real, the depth is not)."""
    folder = source_folder(source)
    src = SafetensorsSource.open(folder)
    config = read_config(folder) or {}
    depth = int(config.get("num_hidden_layers") or 0)
    if depth < 1 or n_layers < 1:
        raise PlanError(f"repeat_blocks: {folder} has no num_hidden_layers, or n_layers {n_layers} < 1")
    model = build_skeleton(folder, torch.float32)
    adapter = adapter_for(model)
    prefix = adapter.blocks_path + "."
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    by_layer: dict[int, list[str]] = {}
    stem: list[str] = []
    for key in src.files:
        layer = adapter.layer_of(key)
        (by_layer.setdefault(layer, []) if layer is not None else stem).append(key)
    weight_map: dict[str, str] = {}
    total = 0
    n_shards = 1 + math.ceil(n_layers / blocks_per_shard)

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
        sizes = _save_shard(out / name, tensors)
        weight_map.update(dict.fromkeys(sizes, name))
        total += sum(sizes.values())

    first = src.entries[stem[0]]["dtype"] if stem else "F32"
    write(0, src.read(stem, _ST_DTYPES[first]))
    for shard in range(1, n_shards):
        tensors: dict[str, torch.Tensor] = {}
        for layer in range((shard - 1) * blocks_per_shard, min(shard * blocks_per_shard, n_layers)):
            keys = by_layer[layer % depth]
            got = src.read(keys, _ST_DTYPES[src.entries[keys[0]]["dtype"]])
            old = f"{prefix}{layer % depth}."
            tensors.update({f"{prefix}{layer}.{k[len(old):]}": v for k, v in got.items()})
        write(shard, tensors)
        del tensors
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config["num_hidden_layers"] = n_layers
    if isinstance(config.get("layer_types"), list) and config["layer_types"]:
        config["layer_types"] = [config["layer_types"][i % depth] for i in range(n_layers)]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in folder.iterdir():
        if extra.is_file() and extra.name not in ("config.json", INDEX_FILE) and extra.suffix != ".safetensors" \
                and not extra.name.startswith("rankwise-"):
            shutil.copy2(extra, out / extra.name)
    return out


__all__ = ["SafetensorsSource", "block_bytes", "build_skeleton", "repeat_blocks", "source_folder", "stream_decompose"]

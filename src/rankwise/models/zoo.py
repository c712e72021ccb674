"""Loading any model rankwise can work on: a bundled alias, a Hugging Face id or folder, or a GGUF file.

One entry point, :func:`load`, returns the model, its tokenizer (optional: a folder of weights and config
alone still loads, see :class:`MissingTokenizer`) and a :class:`ModelInfo`. GGUF files are
dequantized by transformers (slow: about 25 s for SmolLM2-135M), so the converted model is cached once as
an ordinary safetensors folder keyed by the GGUF file's content hash; later loads take a second or two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankwise.errors import ModelLoadError, first_line
from rankwise.fileio import JsonRecord, remove_stale, write_text_atomic
from rankwise.layers.modules import QUANT_METHOD
from rankwise.models.bundled import BUNDLED
from rankwise.models.integrity import (
    check_loading_info,
    check_safetensors_structure,
    outside_declared_model,
    record_files,
    verify_files,
)
from rankwise.settings import cache_dir

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Marker in a converted-GGUF cache folder; its presence means the conversion finished.
_CACHE_DONE = "rankwise-source.json"


@dataclass(frozen=True)
class ModelInfo(JsonRecord):
    """What a user needs to know about a loaded model, printable and JSON-serialisable."""

    name: str
    source: str
    kind: str  # "causal-lm" or "encoder"
    architecture: str  # the config's model_type, e.g. "llama", "bert"
    model_class: str
    dtype: str
    n_params: int
    n_layers: int
    hidden_size: int


@dataclass
class LoadedModel:
    """A model with its tokenizer and description; unpacks as ``model, tokenizer, info``.

    ``tokenizer`` is a :class:`MissingTokenizer` (falsy; raises a clear error when used) when the model
    comes without one: everything but evaluation and calibration works without text.
    """

    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.info))


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}") from None


def param_size(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes of parameters) of a model or any module: the one parameter counter in rankwise.

    Each parameter is counted once, as ``parameters()`` yields them (tied embeddings count once).
    """
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def count_params(module: torch.nn.Module) -> int:
    """Parameters of a model or module (see :func:`param_size`)."""
    return param_size(module)[0]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Content hash of a file: the cache key for converted GGUF models."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load(spec: str | os.PathLike[str], dtype: str | torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    """Load a model from a bundled alias, a local folder or ``.gguf`` file, or a Hugging Face model id.

    A folder holding a rankwise checkpoint (a decomposed model) loads as that decomposed model. The dtype
    rule, the same for every command: ``dtype`` if given; else a rankwise checkpoint keeps the dtype it was
    saved in; everything else loads in float32 (GGUF weights are dequantized to it).
    Raises :class:`ModelLoadError` with a one-line message for anything that cannot be loaded.
    """
    spec_str = str(spec)
    torch_dtype = parse_dtype(dtype if dtype is not None else default_dtype(spec_str))
    bundled = BUNDLED.get(spec_str)
    if bundled is not None:
        path = bundled.locate()
        kind_hint: str | None = bundled.kind
    else:
        path = Path(spec_str).expanduser()
        kind_hint = None
        if not path.exists():
            if _looks_like_path(spec_str):
                raise ModelLoadError(f"no such model file or folder: {spec_str}")
            return _load_hub(spec_str, torch_dtype, device)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf; otherwise give the model's folder")
        folder = gguf_cache_folder(path)
    else:
        folder = path
    return _load_folder(folder, name=spec_str, source=str(path), dtype=torch_dtype, device=device,
                        kind_hint=kind_hint)


def default_dtype(spec: str | os.PathLike[str]) -> str:
    """The dtype :func:`load` uses when none is asked for: a rankwise checkpoint's saved dtype, else float32."""
    config_path = Path(str(spec)).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict) or (config.get("quantization_config") or {}).get("quant_method") != QUANT_METHOD:
        return "float32"
    saved = config.get("dtype") or config.get("torch_dtype")
    return saved if saved in DTYPES else "float32"


def _looks_like_path(spec: str) -> bool:
    """A spec that is clearly a filesystem path, not a hub id like ``org/name``."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith((".gguf", ".safetensors", ".json"))
        or os.sep in spec.strip("/").replace("/", "", 1)  # more than one slash: not a hub id
        or "\\" in spec
    )


def _model_kind(config: Any, kind_hint: str | None) -> str:
    """Decoder LM or encoder, from the config's declared architectures (BERT also has an LM-head class)."""
    if kind_hint:
        return kind_hint
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if archs:
        return "encoder"
    # No declared architectures: ask transformers' own class mappings. The BERT family also has a causal-LM
    # head class, so a family with a masked-LM class reads as an encoder.
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "")
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "causal-lm" if causal and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES \
        else "encoder"


def _auto_classes(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def _load_folder(folder: Path, name: str, source: str, dtype: torch.dtype, device: str,
                 kind_hint: str | None) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
    try:
        json.loads(config_path.read_text())  # a readable config, or one clear line
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: unreadable config.json ({first_line(exc)})") from None
    # A decomposed checkpoint loads through transformers' quantizer hook, which ``import rankwise`` (run
    # before any rankwise module) registers: see rankwise.checkpoint.
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder}: no .safetensors weights (rankwise never unpickles .bin files)")
    try:
        config = AutoConfig.from_pretrained(folder)
        kind = _model_kind(config, kind_hint)
        model, loading = _auto_classes(kind).from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                             output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # transformers raises many types for corrupt or mismatched weights
        raise ModelLoadError(f"cannot load model from {folder}: {first_line(exc)}") from None
    check_loading_info(outside_declared_model(model, loading), folder)  # an error, never random weights
    tokenizer = _optional_tokenizer(lambda: AutoTokenizer.from_pretrained(folder), str(folder), folder)
    return _finish(model, tokenizer, name=name, source=source, kind=kind, device=device)


def _load_hub(model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """A Hugging Face model id: needs a network (or a filled HF cache); never used in tests."""
    from transformers import AutoConfig, AutoTokenizer

    known = ", ".join(BUNDLED)
    offline = not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(model_id, local_files_only=offline)
    except Exception as exc:
        raise ModelLoadError(
            f"unknown model '{model_id}': not a bundled alias ({known}), not a local path, and not loadable "
            f"from the Hugging Face Hub ({first_line(exc)})"
        ) from None
    kind = _model_kind(config, None)
    try:
        model, loading = _auto_classes(kind).from_pretrained(model_id, dtype=dtype, use_safetensors=True,
                                                             local_files_only=offline, output_loading_info=True,
                                                             ignore_mismatched_sizes=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model '{model_id}' from the Hub: {first_line(exc)}") from None
    check_loading_info(outside_declared_model(model, loading), model_id)
    tokenizer = _optional_tokenizer(lambda: AutoTokenizer.from_pretrained(model_id, local_files_only=offline),
                                    f"'{model_id}'", None)
    return _finish(model, tokenizer, name=model_id, source=f"hf:{model_id}", kind=kind, device=device)


#: Files any transformers tokenizer is saved as; a folder with none of them has no tokenizer at all.
TOKENIZER_DEFINITION_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                              "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


class MissingTokenizer:
    """Stands in for the tokenizer of a model that has none (a folder of weights and config only).

    Inspecting, decomposing and saving need no text, so loading such a model succeeds. What does need text
    (evaluation, calibration of data-aware methods) fails on first use with a one-line
    :class:`ModelLoadError` saying the model has no tokenizer, instead of an AttributeError deep inside a
    scorer. It is falsy (``if tokenizer:`` reads it as absent) and ``save_pretrained`` writes nothing, so a
    checkpoint of such a model has no tokenizer either.
    """

    def __init__(self, source: str, reason: str) -> None:
        self._source = source
        self._reason = reason

    def error(self) -> ModelLoadError:
        return ModelLoadError(f"{self._source} has no tokenizer ({self._reason}); evaluation and calibration "
                              f"need text: add the tokenizer's files to the folder")

    def __bool__(self) -> bool:
        return False

    def save_pretrained(self, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        return ()  # nothing to save

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends probe dunders: plain "not there"
            raise AttributeError(name)
        raise self.error()

    def __repr__(self) -> str:
        return f"MissingTokenizer({self._source!r}, {self._reason!r})"


def _optional_tokenizer(load_it: Any, source: str, folder: Path | None) -> Any:
    """The tokenizer ``load_it()`` returns, or a :class:`MissingTokenizer` saying why there is none.

    A folder without tokenizer files is not even tried: for some families transformers would build an
    empty tokenizer (special tokens only) from the config alone, which tokenizes every word as unknown.
    """
    if folder is not None and not any((folder / f).is_file() for f in TOKENIZER_DEFINITION_FILES):
        reason = "no tokenizer files in the folder"
    else:
        try:
            return load_it()
        except Exception as exc:  # transformers raises ValueError/OSError/... for missing or broken files
            reason = f"cannot load it: {first_line(exc)}"
    log.info("%s: loading without a tokenizer (%s)", source, reason)
    return MissingTokenizer(source, reason)


def _hub_reachable() -> bool:
    """False when offline mode is set or the Hub's name does not resolve: then only the local HF cache
    is tried, instead of minutes of retries with back-off before the same failure."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    import socket

    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def _finish(model: torch.nn.Module, tokenizer: Any, name: str, source: str, kind: str, device: str) -> LoadedModel:
    model.eval()
    if device != "cpu":
        model.to(device)
    cfg = model.config
    first = next(model.parameters())
    info = ModelInfo(
        name=name,
        source=source,
        kind=kind,
        architecture=getattr(cfg, "model_type", type(model).__name__),
        model_class=type(model).__name__,
        dtype=str(first.dtype).removeprefix("torch."),
        n_params=count_params(model),
        n_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
        hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def gguf_cache_folder(gguf_path: Path) -> Path:
    """The safetensors copy of a GGUF model, converting it on first use (atomically: temp folder, rename)."""
    try:
        digest = file_sha256(gguf_path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {gguf_path}: {first_line(exc)}") from None
    target = cache_dir() / "gguf" / digest[:32]
    if (target / _CACHE_DONE).is_file():
        problem = _verify_gguf_entry(target)
        if problem is None:
            return target
        log.warning("the cached conversion of %s is damaged (%s): rebuilding it (%s)", gguf_path.name, problem,
                    target)
        _discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, ".convert-")  # conversions of killed processes
    tmp = Path(tempfile.mkdtemp(prefix=f".convert-{os.getpid()}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, tmp)
        record = {"gguf": str(gguf_path), "sha256": digest, "files": record_files(tmp, exclude=[_CACHE_DONE])}
        (tmp / _CACHE_DONE).write_text(json.dumps(record, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _CACHE_DONE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _verify_gguf_entry(target: Path) -> str | None:
    """None if a converted-GGUF cache entry is intact (every file's recorded size and hash); else what is
    wrong. An entry made before sizes and hashes were recorded is checked by its safetensors headers and,
    if sound, gets its record now."""
    try:
        record = json.loads((target / _CACHE_DONE).read_text())
        if not isinstance(record, dict):
            raise ValueError(_CACHE_DONE)
    except (OSError, ValueError):
        return f"{_CACHE_DONE} is unreadable"
    if "files" in record:
        return verify_files(target, record["files"])
    weights = sorted(target.glob("*.safetensors"))
    if not weights or not (target / "config.json").is_file():
        return "no weights or config.json"
    for path in weights:
        problem = check_safetensors_structure(path)
        if problem is not None:
            return problem
    record["files"] = record_files(target, exclude=[_CACHE_DONE])
    with contextlib.suppress(OSError):  # verified this time; a later run that can write records it
        write_text_atomic(target / _CACHE_DONE, json.dumps(record, indent=1))
    return None


def _discard(entry: Path) -> None:
    """Move a damaged cache entry aside (a process still reading it keeps its open files) and delete it."""
    aside = entry.parent / f".bad-{os.getpid()}-{entry.name}"
    try:
        os.replace(entry, aside)
    except OSError:
        aside = entry
    shutil.rmtree(aside, ignore_errors=True)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file to float32 with transformers and save it as an ordinary safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached by content hash)", gguf_path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {first_line(exc)}") from None
    # transformers refuses to save a GGUF-loaded model ("not serializable"); after dequantization it is an
    # ordinary float model, so drop the quantizer state.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

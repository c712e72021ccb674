"""Saving a decomposed model as a Hugging Face folder, and loading any model (checkpoints included).

:func:`save` writes, into a temp folder next to ``out`` that is renamed into place only when complete:

* ``model.safetensors`` - transformers' own ``save_pretrained``: the factor tensors under their module
  names, no dense copy of a decomposed weight, tied embeddings stored once;
* ``config.json`` - the model's config plus ``quantization_config`` (:mod:`rankwise.checkpoint.format`)
  and an ``auto_map`` pointing at ``modeling_rankwise.py``;
* ``modeling_rankwise.py`` - a self-contained model class (torch + transformers only) for
  ``from_pretrained(out, trust_remote_code=True)`` in a process without rankwise;
* the tokenizer's files and ``decomposition_report.json``.

So the folder loads three ways: ``rankwise.load(out)``; plain ``AutoModel*.from_pretrained(out)`` after
``import rankwise`` (the registered quantizer rebuilds the factorized layers); and ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from rankwise.checkpoint.format import (
    FORMAT_VERSION,
    MODELING_FILE,
    QUANT_METHOD,
    REPORT_FILE,
    factorized_modules,
    read_config,
)
from rankwise.checkpoint.output import (
    CheckpointError,
    atomic_folder,
    check_out_folder,
    output_lock,
)
from rankwise.errors import ModelLoadError, RankwiseError, first_line
from rankwise.layers.modules import REPORT_ATTR

#: Auto classes tried, in order, for the ``auto_map`` of the remote-code model class.
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def base_architecture(model: nn.Module) -> str | None:
    """The transformers class the model is (or, for a remote-code class, derives from)."""
    import transformers

    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and getattr(transformers, cls.__name__, None) is cls:
            return cls.__name__
    return None


def auto_class_for(arch: str) -> str | None:
    """The Auto class that maps a config to ``arch`` (``LlamaForCausalLM`` -> ``AutoModelForCausalLM``)."""
    from transformers.models.auto import modeling_auto

    for auto_name, mapping_name in _AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name, {})
        for value in mapping.values():
            if value == arch or (isinstance(value, tuple | list) and arch in value):
                return auto_name
    return None


def modeling_source(arch: str) -> str:
    """The remote-code file for ``arch``: the packaged template plus a class for that architecture."""
    template = importlib.resources.files("rankwise.checkpoint").joinpath(MODELING_FILE).read_text()
    return template + (
        f"\nfrom transformers import {arch} as _RankwiseBase  # noqa: E402\n\n\n"
        f"class Rankwise{arch}(RankwiseModelMixin, _RankwiseBase):\n"
        f'    """{arch} with the factorized layers listed in config.json injected after construction."""\n'
    )


def quantization_config(model: nn.Module, plan: dict[str, Any] | None) -> dict[str, Any]:
    """The ``quantization_config`` block describing the model's factorized layers."""
    return {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "modules": factorized_modules(model),
            "plan": plan}


def _existing_plan(model: nn.Module) -> dict[str, Any] | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    return qc.get("plan") if isinstance(qc, dict) else getattr(qc, "plan", None)


def save(model: nn.Module, out: str | os.PathLike[str], tokenizer: Any = None, report: Any = None,
         overwrite: bool = False, rescue: bool = True) -> Path:
    """Write ``model`` (decomposed or not) as a self-describing Hugging Face folder at ``out``; returns it.

    ``report`` (a :class:`~rankwise.decomposition.report.DecompositionReport`; default: the one
    :func:`rankwise.decompose` attached to the model) provides the plan and ``decomposition_report.json``.
    An existing ``out`` is an error unless ``overwrite``, and even then unless rankwise wrote it; either way
    ``out`` is replaced in one atomic step, under a lock that refuses a concurrent save to the same ``out``
    (see :mod:`rankwise.checkpoint.output`). If writing fails after those checks (a full disk), the
    checkpoint is written to :func:`~rankwise.fileio.rescue_folder` instead (unless ``rescue=False``) and
    the error says where.
    """
    out = Path(out).expanduser()
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise CheckpointError(f"cannot save a {type(model).__name__}: not a transformers model")
    with output_lock(out):
        check_out_folder(out, overwrite)  # also cleans what killed runs left
        try:
            return _save_locked(model, out, tokenizer, report)
        except CheckpointError as exc:
            if not rescue:
                raise
            failure = exc
    # OUT failed after the checks (disk full, folder removed): the decomposed model is not lost
    import tempfile

    from rankwise.fileio import rescue_folder

    try:
        rescued = Path(tempfile.mkdtemp(prefix=f"{out.name}-", dir=rescue_folder())) / out.name
        _save_locked(model, rescued, tokenizer, report)
    except (OSError, CheckpointError):
        raise failure from None
    raise CheckpointError(f"{failure}; the checkpoint was saved to {rescued} instead")


def _save_locked(model: nn.Module, out: Path, tokenizer: Any, report: Any) -> Path:
    report = report if report is not None else getattr(model, REPORT_ATTR, None)
    plan = getattr(report, "plan", None) if report is not None else _existing_plan(model)
    with atomic_folder(out) as tmp:
        _save_pretrained_quietly(model, tmp)
        write_rankwise_files(model, tmp, plan, tokenizer, report)
    return out


def write_rankwise_files(model: nn.Module, folder: Path, plan: Any, tokenizer: Any = None, report: Any = None) -> None:
    """Turn a folder holding a model's ``config.json`` into a rankwise checkpoint: the rankwise
    ``quantization_config`` and, for a transformers architecture, the remote-code file and its ``auto_map``;
    then the tokenizer and ``decomposition_report.json``. Whole-model saves and streamed saves both end here,
    so their folders are the same format."""
    config = read_config(folder) or {}
    config["quantization_config"] = quantization_config(model, plan)
    config.pop("auto_map", None)
    arch = base_architecture(model)
    if arch is not None:
        config["architectures"] = [arch]
        auto = auto_class_for(arch)
        if auto is not None:
            (folder / MODELING_FILE).write_text(modeling_source(arch))
            config["auto_map"] = {auto: f"{MODELING_FILE.removesuffix('.py')}.Rankwise{arch}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        tokenizer.save_pretrained(folder)
    if report is not None:
        text = report.to_json() if hasattr(report, "to_json") else json.dumps(report, indent=2)
        (folder / REPORT_FILE).write_text(text + "\n")


def _save_pretrained_quietly(model: nn.Module, folder: Path) -> None:
    """transformers' ``save_pretrained`` without its own progress bar (rankwise prints its own output)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # Tensors under the model's own module names (the names quantization_config lists), not renamed back
        # to a family's legacy checkpoint names: the remote-code class is custom code, for which transformers
        # applies no renaming on load (GPT-NeoX's lm_head would be saved as embed_out and not found).
        model.save_pretrained(folder, save_original_format=False)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load(spec: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu"):
    """Load any model spec (bundled alias, folder, .gguf, hub id), including rankwise checkpoints.

    :func:`rankwise.models.load` under the name savers look for next to :func:`save`: one loader, one dtype
    rule (a rankwise checkpoint keeps the dtype it was saved in unless ``dtype`` says otherwise; other models
    load in float32). Returns :class:`~rankwise.models.LoadedModel` (model, tokenizer, info).
    """
    from rankwise.models import load as load_model

    try:
        return load_model(spec, dtype=dtype, device=device)
    except RankwiseError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {spec}: {first_line(exc)}") from None

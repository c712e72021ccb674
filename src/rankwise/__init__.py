"""rankwise: low-rank decomposition of transformer language models, and its accuracy-efficiency trade-off.

The package reads like the architecture (lowest layer first; imports only go down, see tests/test_layering.py):

* :mod:`rankwise.errors`, :mod:`rankwise.fileio`, :mod:`rankwise.settings`, :mod:`rankwise.caches`,
  :mod:`rankwise.devices` - errors, atomic writes, settings, the cache folder, devices;
* :mod:`rankwise.layers` - factorized layers and the helpers that find, swap and merge them;
* :mod:`rankwise.models` - loading (bundled aliases, HF ids and folders, GGUF), architecture adapters,
  what a model's forward takes;
* :mod:`rankwise.design` - targets, rank conventions, plans and the design-space size;
* :mod:`rankwise.analysis` - spectra of the target weights (``rankwise inspect``);
* :mod:`rankwise.calibration` - statistics the data-aware methods need;
* :mod:`rankwise.checkpoint` - the checkpoint format, saving, transformers registration;
* :mod:`rankwise.decomposition` - methods (Tucker, SVD, ASVD, SVD-LLM, FWSVD), solvers, applying a plan
  (:func:`decompose_`, :func:`merge_`), error compensation, layer removal, streaming;
* :mod:`rankwise.evaluation` - the scoring engine and benchmark tasks;
* :mod:`rankwise.efficiency` - size, FLOPs, latency, memory, energy and execution forms;
* :mod:`rankwise.allocation` - sensitivity profiles and rank allocation under a budget;
* :mod:`rankwise.studies` - design-space sweeps and searches on Optuna;
* :mod:`rankwise.reports` - figures and the HTML report; :mod:`rankwise.paper` - the paper's case studies;
* :mod:`rankwise.cli` - the ``rankwise`` command.

``import rankwise`` also teaches transformers the rankwise checkpoint format, so a saved decomposed model
loads with plain ``AutoModelForCausalLM.from_pretrained(folder)`` in this process.
"""

from typing import Any

import rankwise.checkpoint  # noqa: F401  (registers the checkpoint format with transformers, lazily)
from rankwise.checkpoint import load, save
from rankwise.errors import RankwiseError
from rankwise.models import load as load_model

__version__ = "0.1.0"

__all__ = ["RankwiseError", "__version__", "choose_execution", "decompose", "decompose_", "load", "load_model", "merge",
           "merge_", "save"]


def __getattr__(name: str) -> Any:
    """``rankwise.decompose_`` / ``merge_`` / ``choose_execution`` import their machinery on first use
    (``decompose`` / ``merge`` are today's names, kept as aliases for one release)."""
    if name in ("decompose", "merge", "decompose_", "merge_"):
        from rankwise.decomposition import apply

        return getattr(apply, name)
    if name == "choose_execution":
        from rankwise.efficiency.execution import choose_execution

        return choose_execution
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")

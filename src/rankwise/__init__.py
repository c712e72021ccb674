"""rankwise: low-rank decomposition of transformer language models, and its accuracy-efficiency trade-off.

The package reads like the architecture:

* :mod:`rankwise.models` - loading (bundled aliases, HF ids and folders, GGUF) and architecture adapters;
* :mod:`rankwise.design` - targets, rank conventions, plans and the design-space size;
* :mod:`rankwise.analysis` - spectra of the target weights (``rankwise inspect``);
* :mod:`rankwise.decomposition` - decomposition methods (Tucker, SVD, ASVD, SVD-LLM, FWSVD) and solvers;
* :mod:`rankwise.calibration` - statistics the data-aware methods need;
* :mod:`rankwise.surgery` - applying a plan to a model (:func:`decompose`, :func:`merge`);
* :mod:`rankwise.layers` - factorized layers; :mod:`rankwise.checkpoint` - save and load;
* :mod:`rankwise.evaluation` - benchmark tasks and the scoring engine;
* :mod:`rankwise.efficiency` - size, FLOPs, latency, memory and energy;
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

__all__ = ["RankwiseError", "__version__", "choose_execution", "decompose", "load", "load_model", "merge", "save"]


def __getattr__(name: str) -> Any:
    """``rankwise.decompose`` / ``merge`` / ``choose_execution`` import their machinery on first use."""
    if name in ("decompose", "merge"):
        from rankwise import surgery

        return getattr(surgery, name)
    if name == "choose_execution":
        from rankwise.efficiency.execution import choose_execution

        return choose_execution
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")

"""Decomposition methods (Tucker, SVD, ASVD, SVD-LLM, FWSVD), their shared interface, and SVD solvers.

Importing this package imports every method module, which registers each method by name; look methods up
with :func:`get_method` (``get_method("asvd", alpha=0.25)``: each method's settings are a frozen config
dataclass, its ``config_class``). To add a method, write one class in one new module (a subclass of
:class:`DecompositionMethod` with a ``name`` registers itself; :func:`register_method` re-registers one by
hand) and import it below.
"""

from rankwise.decomposition import asvd, fwsvd, svd, svd_llm, tucker
from rankwise.decomposition.base import (
    CalibrationStats,
    DecompositionMethod,
    Factors,
    MethodConfig,
    MethodResult,
    SolverConfig,
    SolverMethod,
    available_methods,
    check_weight,
    get_method,
    method_class,
    method_settings,
    register_method,
    relative_error,
    setting,
    weighted_error,
)

__all__ = [
    "CalibrationStats",
    "DecompositionMethod",
    "Factors",
    "MethodConfig",
    "MethodResult",
    "SolverConfig",
    "SolverMethod",
    "asvd",
    "available_methods",
    "check_weight",
    "fwsvd",
    "get_method",
    "method_class",
    "method_settings",
    "register_method",
    "relative_error",
    "setting",
    "svd",
    "svd_llm",
    "tucker",
    "weighted_error",
]

"""Deprecated: the decomposition report now lives in :mod:`rankwise.decomposition.report`.

Kept for one release so existing imports work; nothing inside rankwise imports this module.
"""

from rankwise.decomposition.report import *  # noqa: F403
from rankwise.decomposition.report import DecompositionReport, TargetReport  # noqa: F401

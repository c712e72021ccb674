"""Deprecated: applying a plan now lives in :mod:`rankwise.decomposition.apply` (``decompose_``, ``merge_``).

Kept for one release so existing imports work; nothing inside rankwise imports this module.
"""

from rankwise.decomposition.apply import *  # noqa: F403
from rankwise.decomposition.apply import REPORT_ATTR, as_plan, decompose, decompose_, merge, merge_  # noqa: F401

"""Rank allocation under a size budget: budget units, sensitivity profiles, allocators, plans from them.

Layering: this package sits above decomposition/evaluation (it measures decomposed targets) and below the
CLI. ``rankwise allocate`` (:mod:`rankwise.cli.allocate_cmd`) is the command-line face of
:func:`rankwise.allocation.plan.allocate_plan`.
"""

from rankwise.allocation.allocators import (
    Allocation,
    Allocator,
    Problem,
    available_allocators,
    get_allocator,
    register_allocator,
)
from rankwise.allocation.budget import UNITS, Accounting, Budget, TargetSize, accounting_for

__all__ = [
    "UNITS",
    "Accounting",
    "Allocation",
    "Allocator",
    "Budget",
    "Problem",
    "TargetSize",
    "accounting_for",
    "available_allocators",
    "get_allocator",
    "register_allocator",
]

"""The design space: targets, rank conventions, plans and the size of the space."""

from rankwise.design.plan import DecompSpec, Plan, Rule, Target
from rankwise.design.ranks import (
    RankSpec,
    break_even_rank,
    break_even_rank_three_factor,
    energy_rank,
    factor_params,
    parse_rank,
    resolve_rank,
)
from rankwise.design.space import DesignSpaceSize, design_space, paper_space_size, per_target_space_size

__all__ = [
    "DecompSpec",
    "DesignSpaceSize",
    "Plan",
    "RankSpec",
    "Rule",
    "Target",
    "break_even_rank",
    "break_even_rank_three_factor",
    "design_space",
    "energy_rank",
    "factor_params",
    "paper_space_size",
    "parse_rank",
    "per_target_space_size",
    "resolve_rank",
]

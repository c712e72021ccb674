"""The size of the design space, counted exactly.

Two parameterisations:

* **paper** (Moar et al.): a subset of the L layers, one mask over the T tensor roles shared by the chosen
  layers, and one rank for the whole configuration from a set of R choices:
  ``N_paper = 2^L · 2^T · R``  (log2 = L + T + log2 R). Llama-2-7B (L=32, T=7, ranks pruned to R=1)
  gives 2^39, the paper's O(2^39).
* **per-target rank**: every target independently stays dense or takes any rank that makes it smaller
  than dense under the paper's three-factor form, i.e. 1..r*_t with r*_t the largest r such that
  r(m+n) + r² <= m·n:  ``N_target = Π_t (1 + r*_t)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rankwise.design.ranks import break_even_rank_three_factor
from rankwise.models.adapters import TargetInfo


@dataclass(frozen=True)
class DesignSpaceSize:
    paper: int
    per_target: int

    @property
    def paper_log2(self) -> float:
        return math.log2(self.paper)

    @property
    def per_target_log2(self) -> float:
        return math.log2(self.per_target)

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "paper": self.paper,
            "paper_log2": self.paper_log2,
            "paper_formula": "2^L * 2^T * R",
            "per_target": str(self.per_target),  # exact integer as a string: too large for JSON readers
            "per_target_log2": self.per_target_log2,
            "per_target_formula": "prod_t (1 + r*_t), r*_t = max r with r(m+n)+r^2 <= m*n",
        }


def paper_space_size(n_layers: int, n_tensors: int, n_rank_choices: int = 1) -> int:
    """2^L · 2^T · R: layer subsets × tensor masks × rank choices (the paper's parameterisation)."""
    if n_layers < 0 or n_tensors < 0 or n_rank_choices < 1:
        raise ValueError("layers and tensors must be >= 0 and rank choices >= 1")
    return (1 << n_layers) * (1 << n_tensors) * n_rank_choices


def per_target_space_size(shapes: Sequence[tuple[int, int]]) -> int:
    """Π (1 + r*_t) over targets of shape (m, n): dense, or any rank that saves parameters."""
    total = 1
    for m, n in shapes:
        total *= 1 + break_even_rank_three_factor(m, n)
    return total


def design_space(targets: Sequence[TargetInfo], n_rank_choices: int = 1) -> DesignSpaceSize:
    layers = {t.layer for t in targets}
    roles = {t.role for t in targets}
    return DesignSpaceSize(
        paper=paper_space_size(len(layers), len(roles), n_rank_choices),
        per_target=per_target_space_size([t.shape for t in targets]),
    )

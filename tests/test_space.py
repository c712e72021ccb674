"""Design-space size: the paper's formula and the per-target-rank count, checked by brute force."""

from __future__ import annotations

import itertools
import math

from rankwise.design import break_even_rank_three_factor, paper_space_size, per_target_space_size
from rankwise.design.ranks import factor_params


def test_llama2_7b_paper_count():
    """Llama-2-7B: 32 decoder layers, 7 tensors, ranks pruned to 1 -> 2^32 · 2^7 · 1 = 2^39."""
    n = paper_space_size(32, 7, 1)
    print(f"Llama-2-7B design space (paper: 2^L * 2^T * R, L=32, T=7, R=1): {n} = 2^{math.log2(n):.0f}")
    assert n == 549_755_813_888 == 2**39
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    per_target = per_target_space_size(shapes * 32)
    print(f"Llama-2-7B per-target-rank space: 2^{math.log2(per_target):.1f}")
    expected = 1
    for m, n_ in shapes * 32:
        expected *= 1 + break_even_rank_three_factor(m, n_)
    assert per_target == expected


def test_paper_formula_by_enumeration():
    """Enumerate (layer subset, tensor mask, rank) configurations of a 3-layer, 2-tensor model with 2 ranks."""
    layers, tensors, ranks = 3, 2, (1, 8)
    configs = {
        (subset, mask, r)
        for subset in itertools.product((0, 1), repeat=layers)
        for mask in itertools.product((0, 1), repeat=tensors)
        for r in ranks
    }
    assert paper_space_size(layers, tensors, len(ranks)) == len(configs) == 64


def test_break_even_tucker_brute_force():
    for m, n in [(576, 576), (192, 576), (1536, 576), (7, 3), (1, 1), (384, 1536)]:
        best = max((r for r in range(0, min(m, n) + 1) if factor_params(r, m, n) <= m * n), default=0)
        assert break_even_rank_three_factor(m, n) == best
    assert per_target_space_size([(2, 2), (3, 3)]) == (1 + break_even_rank_three_factor(2, 2)) * (1 + break_even_rank_three_factor(3, 3))

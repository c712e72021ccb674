"""Which items of a benchmark to evaluate: all, the first N (``--limit``) or a seeded random N (``--sample``).

``--limit`` matches lm-eval's ``--limit`` (the first N documents of the evaluation split), so limited runs
are comparable with lm-eval's. ``--sample`` draws a reproducible random subset instead: the first N items
of a file are often not representative (ARC files are sorted by source, MMLU subjects by topic).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rankwise.errors import RankwiseError


@dataclass(frozen=True)
class Subset:
    """The chosen item indices (ascending) and a one-line description for the protocol."""

    indices: list[int]
    description: str


def validate(limit: int | None, sample: int | None) -> None:
    """One-line errors for a bad subset request (checked before a model is loaded)."""
    if limit is not None and sample is not None:
        raise RankwiseError("--limit and --sample are mutually exclusive: choose one")
    if limit is not None and limit < 1:
        raise RankwiseError(f"--limit must be a positive integer, got {limit}")
    if sample is not None and sample < 1:
        raise RankwiseError(f"--sample must be a positive integer, got {sample}")


def select(total: int, limit: int | None = None, sample: int | None = None, seed: int = 1234) -> Subset:
    """Indices of the items to evaluate out of ``total``; ``limit`` and ``sample`` are mutually exclusive."""
    validate(limit, sample)
    if limit is not None:
        n = min(limit, total)
        return Subset(list(range(n)), f"first {n} of {total} (--limit {limit})")
    if sample is not None:
        n = min(sample, total)
        chosen = sorted(random.Random(seed).sample(range(total), n))
        return Subset(chosen, f"random {n} of {total} (--sample {sample} --seed {seed})")
    return Subset(list(range(total)), f"all {total}")

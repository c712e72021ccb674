"""Rank conventions, as in TensorLy: how a plan says "how much to keep" for one matrix.

* an ``int`` r >= 1 is an exact rank (a float with an integer value above 1, ``2.0``, too; ``1.0`` is
  refused as ambiguous between exact rank 1 and keeping all of the parameters);
* a ``float`` in (0, 1) is the fraction of the matrix's parameters to keep (the factors' parameter count,
  which depends on the factorized form, must not exceed ``fraction * m * n``);
* ``"energy:0.9"`` keeps the smallest rank whose singular values hold that fraction of the squared
  spectrum (the Frobenius "energy").

``rank: 1`` is the paper's setting. Ranks resolve to an int per matrix with :func:`resolve_rank`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rankwise.errors import PlanError

Form = Literal["three_factor", "two_factor"]


@dataclass(frozen=True)
class RankSpec:
    """A parsed rank: ``kind`` is ``exact``, ``fraction`` or ``energy``; ``value`` its number."""

    kind: Literal["exact", "fraction", "energy"]
    value: float

    def to_plain(self) -> int | float | str:
        """The form a person writes in a plan (round-trips through :func:`parse_rank`)."""
        if self.kind == "exact":
            return int(self.value)
        if self.kind == "fraction":
            return float(self.value)
        return f"energy:{self.value:g}"

    def __str__(self) -> str:
        return str(self.to_plain())


def parse_rank(value: object, field: str = "rank") -> RankSpec:
    """Parse a plan's rank value; a bad one raises :class:`PlanError` naming ``field``."""
    if isinstance(value, RankSpec):
        return value
    if isinstance(value, bool):
        raise PlanError(f"{field}: {value!r} is not a rank (use an int >= 1, a fraction in (0, 1) or 'energy:F')")
    if isinstance(value, int):
        if value < 1:
            raise PlanError(f"{field}: rank {value} is below 1")
        return RankSpec("exact", value)
    if isinstance(value, float):
        if value == 1.0:  # exact rank 1, or all of the parameters? Refused rather than guessed.
            raise PlanError(f"{field}: 1.0 is ambiguous: write 1 for exact rank 1, or a fraction below 1 "
                            f"(e.g. 0.99) to keep that share of the parameters")
        if value.is_integer() and value > 1:
            return RankSpec("exact", int(value))
        if not 0.0 < value < 1.0:
            raise PlanError(f"{field}: {value} is neither an int rank >= 1 nor a parameter fraction in (0, 1)")
        return RankSpec("fraction", value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("energy:"):
            try:
                energy = float(text.split(":", 1)[1])
            except ValueError:
                raise PlanError(f"{field}: '{value}' is not 'energy:F' with F a number") from None
            if not 0.0 < energy <= 1.0:
                raise PlanError(f"{field}: energy fraction {energy} is not in (0, 1]")
            return RankSpec("energy", energy)
        try:
            return parse_rank(int(text), field)  # "1" is exact rank 1; "1.0" is the float, and ambiguous
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise PlanError(
                f"{field}: '{value}' is not a rank (use an int >= 1, a fraction in (0, 1) or 'energy:F')"
            ) from None
        return parse_rank(number, field)
    raise PlanError(f"{field}: {value!r} is not a rank (use an int >= 1, a fraction in (0, 1) or 'energy:F')")


def factor_params(rank: int, m: int, n: int, form: Form = "three_factor") -> int:
    """Parameters of the factors of an m x n matrix at ``rank``: r(m+n)+r² (Tucker-2) or r(m+n)."""
    return rank * (m + n) + (rank * rank if form == "three_factor" else 0)


def break_even_rank(m: int, n: int) -> float:
    """r* = m·n/(m+n): above it, a two-factor layer has more parameters than the dense one."""
    return m * n / (m + n)


def break_even_rank_three_factor(m: int, n: int) -> int:
    """The largest r with r(m+n) + r² <= m·n: break-even for the paper's three-factor Tucker form."""
    s = m + n
    r = int((-s + math.sqrt(s * s + 4 * m * n)) / 2)
    while factor_params(r + 1, m, n) <= m * n:
        r += 1
    while r > 0 and factor_params(r, m, n) > m * n:
        r -= 1
    return r


def energy_rank(singular_values: Sequence[float], energy: float) -> int:
    """Smallest r whose top-r singular values hold ``energy`` of the sum of squared singular values."""
    squares = [float(s) ** 2 for s in singular_values]
    total = sum(squares)
    if total == 0.0:
        return 1
    acc = 0.0
    for i, sq in enumerate(squares, start=1):
        acc += sq
        if acc >= energy * total * (1 - 1e-12):
            return i
    return len(squares)


def fraction_rank(fraction: float, m: int, n: int, form: Form = "three_factor") -> int:
    """Largest rank whose factors keep at most ``fraction`` of the m·n parameters (at least 1)."""
    budget = fraction * m * n
    r = max(1, int(budget // (m + n)))
    while r > 1 and factor_params(r, m, n, form) > budget:
        r -= 1
    while factor_params(r + 1, m, n, form) <= budget and r + 1 <= min(m, n):
        r += 1
    return min(r, min(m, n))


def resolve_rank(spec: RankSpec, m: int, n: int, singular_values: Sequence[float] | None = None,
                 form: Form = "three_factor", field: str = "rank") -> int:
    """The int rank a spec means for an m x n matrix; exact ranks are checked against 1..min(m, n)."""
    full = min(m, n)
    if spec.kind == "exact":
        r = int(spec.value)
        if r < 1 or r > full:
            raise PlanError(f"{field}: rank {r} is outside 1..min(m, n) = {full} for a {m}x{n} matrix")
        return r
    if spec.kind == "fraction":
        return fraction_rank(spec.value, m, n, form)
    if singular_values is None:
        raise PlanError(f"{field}: 'energy:{spec.value:g}' needs the matrix's singular values")
    return min(full, energy_rank(singular_values, spec.value))

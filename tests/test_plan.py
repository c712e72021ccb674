"""Plans: parsing, selectors, validation errors (each bad field), YAML/JSON round trip, resolution."""

from __future__ import annotations

import pytest

from rankwise.design import Plan, RankSpec, parse_rank, resolve_rank
from rankwise.design.ranks import energy_rank, fraction_rank
from rankwise.errors import PlanError
from rankwise.models.adapters import TargetInfo

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"attn": ROLES[:4], "mlp": ROLES[4:], "all": ROLES}
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
TARGETS = [TargetInfo(layer, role, f"model.layers.{layer}.{role}", *SHAPES[role], False)
           for layer in range(30) for role in ROLES]
METHODS = {"tucker", "svd", "asvd", "svd-llm", "fwsvd"}

PLAN_YAML = """
name: paper-9pct-plus
method: tucker
rank: 1
layers: [2, 17, 29]
tensors: all
overrides:
  - {layers: "20-22", tensors: [down], rank: 0.5, method: svd}
  - {layers: "0,3-4", tensors: [attn], rank: "energy:0.9"}
  - {layers: [17], tensors: [q], skip: true}
"""


def resolve(plan: Plan):
    return plan.resolve(TARGETS, ROLES, GROUPS, METHODS)


def test_paper_plan_selects_21_targets():
    plan = Plan.simple(layers="2,17,29", tensors="all", rank=1, method="tucker")
    chosen = resolve(plan)
    assert len(chosen) == 21 and {layer for layer, _ in chosen} == {2, 17, 29}
    assert all(spec.rank == RankSpec("exact", 1) and spec.method.name == "tucker" for spec in chosen.values())


def test_overrides_apply_in_order():
    chosen = resolve(Plan.from_text(PLAN_YAML))
    assert (17, "q") not in chosen  # skipped
    assert chosen[(20, "down")].method.name == "svd" and chosen[(20, "down")].rank == RankSpec("fraction", 0.5)
    assert (20, "q") not in chosen  # override only adds the tensors it names
    assert chosen[(3, "k")].rank == RankSpec("energy", 0.9) and chosen[(3, "k")].method.name == "tucker"
    assert chosen[(2, "gate")].rank == RankSpec("exact", 1)
    assert len(chosen) == 21 - 1 + 3 + 3 * 4


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_unchanged(fmt, tmp_path):
    plan = Plan.from_text(PLAN_YAML)
    text = plan.to_yaml() if fmt == "yaml" else plan.to_json()
    again = Plan.from_text(text, fmt)
    assert again == plan
    assert (again.to_yaml() if fmt == "yaml" else again.to_json()) == text
    path = tmp_path / f"plan.{fmt}"
    plan.save(path)
    assert Plan.from_file(path) == plan


@pytest.mark.parametrize(
    "text, field",
    [
        ("rank: 0", "rank: rank 0 is below 1"),
        ("rank: -3", "rank: rank -3 is below 1"),
        ("rank: 1.5", "rank: 1.5 is neither"),
        ("rank: 'energy:1.5'", "rank: energy fraction 1.5"),
        ("rank: abc", "rank: 'abc' is not a rank"),
        ("rank: true", "rank: True is not a rank"),
        ("layers: '9-3'", "layers: layer range '9-3' is empty"),
        ("layers: 'x'", "layers: 'x' is not a layer index"),
        ("layers: []", "layers: empty list"),
        ("tensors: []", "tensors: no tensors selected"),
        ("method: 3", "method: expected a method name"),
        ("fold: maybe", "fold: 'maybe' must be auto"),
        ("force: 2", "force: expected true or false"),
        ("colour: red", "plan: unknown field 'colour'"),
        ("overrides: {a: 1}", "overrides: expected a list"),
        ("overrides: [{tensors: [q]}]", "overrides[0].layers: missing"),
        ("overrides: [{layers: [1], rank: 0}]", "overrides[0].rank: rank 0 is below 1"),
        ("overrides: [{layers: [1], size: 3}]", "overrides[0]: unknown field 'size'"),
        ("[1, 2", "plan: not valid YAML"),
        ("- 1\n- 2", "plan: expected a mapping"),
    ],
)
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(PlanError) as info:
        Plan.from_text(text)
    message = str(info.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize(
    "data, field",
    [
        ({"layers": [30]}, "layers: layer 30 is out of range 0..29"),
        ({"layers": "28-31"}, "layers: layer 30 is out of range"),
        ({"tensors": ["qq"]}, "tensors: unknown tensor role 'qq'"),
        ({"rank": 577, "tensors": ["q"], "layers": [0]}, "rank (layer 0 q): rank 577 is outside 1..min(m, n) = 576"),
        ({"rank": 193, "tensors": ["k"], "layers": [0]}, "min(m, n) = 192"),
        ({"method": "magic"}, "method: unknown method 'magic'"),
        ({"overrides": [{"layers": [40]}]}, "overrides[0].layers: layer 40 is out of range"),
        ({"overrides": [{"layers": [1], "tensors": ["zz"]}]}, "overrides[0].tensors: unknown tensor role 'zz'"),
        ({"overrides": [{"layers": [1], "method": "nope"}]}, "overrides[0].method: unknown method 'nope'"),
    ],
)
def test_validation_against_model_names_the_field(data, field):
    plan = Plan.from_dict(data)
    with pytest.raises(PlanError) as info:
        resolve(plan)
    assert field in str(info.value)


def test_rank_conventions():
    assert parse_rank(1) == RankSpec("exact", 1)
    assert parse_rank("8") == RankSpec("exact", 8)
    assert parse_rank(0.25) == RankSpec("fraction", 0.25)
    assert parse_rank("energy:0.9") == RankSpec("energy", 0.9)
    # fraction: largest r with r(m+n)+r² <= f·m·n
    r = fraction_rank(0.5, 576, 1536)
    assert r * 2112 + r * r <= 0.5 * 576 * 1536 < (r + 1) * 2112 + (r + 1) ** 2
    assert resolve_rank(RankSpec("fraction", 0.5), 576, 1536, form="two_factor") == int(0.5 * 576 * 1536 // 2112)
    s = [3.0, 2.0, 1.0, 0.5]
    assert energy_rank(s, 0.9) == 2 and energy_rank(s, 0.99) == 4  # 13/14.25 = 0.912
    assert resolve_rank(RankSpec("energy", 0.9), 4, 4, singular_values=s) == 2

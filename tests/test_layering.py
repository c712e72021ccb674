"""The package reads like the architecture: imports run one way, from higher layers to lower ones.

The order below is the one the README's layout section describes; it is written once, here. Every import
inside ``src/rankwise`` (also those inside functions) between two first-level units (a sub-package or a
top-level module) must go from a unit to one listed before it. The root ``rankwise/__init__.py`` is the
public facade and ``__main__`` the entry point: both may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rankwise"

#: Lowest first. Units on one line are peers at the same level and must not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("fileio",),
    ("settings",),
    ("caches", "devices"),
    ("layers",),
    ("models",),
    ("design",),
    ("analysis",),
    ("calibration",),
    ("checkpoint",),
    ("decomposition",),
    ("evaluation",),
    ("efficiency",),
    ("allocation",),
    ("studies",),
    ("reports",),
    ("paper",),
    ("cli",),
]
FACADES = {"__init__", "__main__"}
#: Deprecated module paths kept for one release as re-exports of their new homes; nothing inside imports them.
ALIASES = {"surgery", "decomposition_report"}


def _level() -> dict[str, int]:
    return {unit: i for i, group in enumerate(LAYERS) for unit in group}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _unit(dotted: list[str]) -> str:
    return dotted[1] if len(dotted) > 1 else "__init__"


def import_edges() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every import between two first-level units."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[list[str]] = []
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name[: len(name) - node.level + (path.name == "__init__.py")]
                    targets = [base + (node.module.split(".") if node.module else [])]
                elif node.module:
                    targets = [node.module.split(".")]
            for target in targets:
                if target[0] == "rankwise" and _unit(target) != _unit(name):
                    edges.add((_unit(name), _unit(target), str(path.relative_to(PACKAGE.parent))))
    return edges


def test_every_unit_has_a_place_in_the_order():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    missing = sorted(units - set(_level()) - FACADES - ALIASES)
    assert not missing, f"units with no place in LAYERS (add them where they belong): {missing}"


def test_imports_only_go_down():
    level = _level()
    upward = sorted(f"{src} -> {dst} ({where})" for src, dst, where in import_edges()
                    if src not in FACADES | ALIASES
                    and (dst in FACADES | ALIASES or level.get(dst, -1) >= level.get(src, -1)))
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_cycles_between_units():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in import_edges():
        if src not in FACADES | ALIASES:
            graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_deprecated_aliases_are_the_same_functions():
    """Old imports keep working for one release and run the very same code (nothing inside imports them)."""
    import rankwise.decomposition.apply as apply
    import rankwise.decomposition.report as report
    import rankwise.decomposition_report as old_report
    import rankwise.surgery as old_apply

    assert old_apply.decompose is apply.decompose_ and old_apply.merge is apply.merge_
    assert old_report.DecompositionReport is report.DecompositionReport

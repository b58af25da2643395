"""The package's shape: stages talk through artefacts, imports flow one way, files stay small.

Pins issue 15 ("one pattern per kind of room"): stage modules used to import each other (05
took datum helpers from 03, 09 took helpers from 03, 05, 06 and 08), three local-engine modules
imported each other in a circle, and stage 09 had grown to 1.5k lines. These checks read the
source with `ast` (nothing is imported or run), so they cost milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "character_training"
LIB = Path(__file__).resolve().parents[1] / "lib" / PACKAGE
MAX_LINES = 800
LENGTH_REASON = "Length:"  # a module over MAX_LINES says why in its docstring, on such a line


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Package modules that ``path`` imports anywhere (also inside functions), resolved to the
    most specific known module. Type-checking-only imports count too (a circle of names is a
    circle of dependencies); the module's own parent packages do not (Python initialises them
    first anyway)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE):
                found.add(target)
    # a submodule's own parent packages are initialised before it anyway: not an edge
    return {t for t in found if not name.startswith(t + ".")}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported_modules(path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative three-colour DFS)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            if child not in graph:
                continue
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_no_stage_module_imports_another_stage_module():
    graph = import_graph()
    stages = {m for m in graph if m.startswith(f"{PACKAGE}.stages.")}
    offenders = sorted(f"{m} imports {t}" for m in stages for t in graph[m] if t in stages)
    assert offenders == []


def test_nothing_below_the_stages_imports_a_stage():
    graph = import_graph()
    layers_above = (f"{PACKAGE}.stages", f"{PACKAGE}.runner", f"{PACKAGE}.cli")
    below = {m for m in graph if not m.startswith(layers_above)}
    offenders = sorted(
        f"{m} imports {t}"
        for m in below
        for t in graph[m]
        if t.startswith(f"{PACKAGE}.stages.") and m not in {f"{PACKAGE}.stages"}
    )
    assert offenders == []


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_long_module_says_why_it_is_long(name):
    path = modules()[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert LENGTH_REASON in docstring, (
        f"{path.relative_to(LIB.parent)} has {lines} lines (> {MAX_LINES}): split it by job, "
        f"or give the reason on a '{LENGTH_REASON}' line of its docstring"
    )

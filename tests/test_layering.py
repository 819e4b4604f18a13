"""The package's shape, read from its source (no imports run): the layers import only downwards, nothing
imports a command-line shell, there is no import cycle (function-local imports included, so a local import
cannot hide one), and no function is longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "c2a"

# Each package may import only from its own layer and the ones before it (DESIGN.md, "Layout").
LAYERS = [
    ("c2a.config", "c2a.config_diff", "c2a.errors", "c2a.options"),
    ("c2a.kernels",),
    ("c2a.model",),
    ("c2a.data",),
    ("c2a.inference",),
    ("c2a.plan",),
    ("c2a.train",),
    ("c2a.generate", "c2a.eval"),  # shells at the top of the package
]
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = modules()


def is_shell(name: str, tree: ast.Module) -> bool:
    """A `python -m` entry point: a __main__ module, or one with an `if __name__ == "__main__":` block."""
    if name.endswith("__main__"):
        return True
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name):
            if node.test.left.id == "__name__":
                return True
    return False


def imports(name: str, tree: ast.Module) -> set[str]:
    """The c2a modules `name` imports anywhere in its source; `from pkg import sub` counts as pkg.sub when that
    is a module, else as pkg (its __init__)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


def layer(name: str) -> int:
    if name == "c2a":
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layering.py's LAYERS: add it where it belongs")


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
GRAPH = {name: imports(name, tree) - {name} for name, tree in TREES.items()}
SHELLS = {name for name, tree in TREES.items() if is_shell(name, tree)}


def test_the_shells_are_found() -> None:
    # the README's commands: a shell each (if this fails, the detection above broke, not the package)
    assert {
        "c2a.train.__main__",
        "c2a.plan.__main__",
        "c2a.generate",
        "c2a.eval",
        "c2a.data.prepare",
        "c2a.model.convert",
        "c2a.train.plot",
        "c2a.train.compare",
        "c2a.data.demo.__main__",
    } <= SHELLS


def test_nothing_imports_a_shell() -> None:
    bad = sorted(f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets if b in SHELLS)
    assert not bad, bad


def test_packages_import_only_downwards() -> None:
    # a package's __init__ re-exporting its own modules is within one layer; a shell may use any layer
    bad = sorted(
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in GRAPH.items()
        for b in targets
        if a not in SHELLS and layer(b) > layer(a)
    )
    assert not bad, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_fit_on_a_screen(name: str) -> None:
    long = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                long.append(f"{node.name}: {node.end_lineno - start + 1} lines (line {start})")
    assert not long, long


def test_run_is_the_outline() -> None:
    """`run` stays the run's outline: setup, loop, finish, on one screen (at most 60 lines)."""
    (run,) = [n for n in ast.walk(TREES["c2a.train.loop"]) if isinstance(n, ast.FunctionDef) and n.name == "run"]
    assert run.end_lineno - run.lineno + 1 <= 60

"""The package's shape: no import cycles, no module importing from a layer above it, no
module over 600 lines. An AST walk over every ``import`` in ``captum_gim`` (function-level
imports included), so the check needs no import of the package itself."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1] / "captum_gim"
MAX_LINES = 600

#: layer of each top-level part of the package; a module may import only from its own
#: layer or below. (A part not listed fails the test, so a new folder gets a place here.)
LAYERS: Dict[str, int] = {
    "_version": 0,
    "errors": 0,
    "config": 0,
    "_coverage": 0,
    "_compat": 0,
    "ops": 1,
    "_patching": 2,
    "_context": 2,
    "registry": 2,
    "rules": 3,
    "scope": 4,
    "attr": 5,
    "viz": 6,
    "adapters": 7,
    "pyhealth": 7,
    "integrations": 8,
    "evaluation": 9,
    "dataset": 10,
    "cli": 11,
    "__main__": 11,
    "__init__": 11,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


_FILES: Dict[str, Path] = {}


def _imports(path: Path, name: str) -> Set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("captum_gim"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("captum_gim"):
                continue
            # `from . import x` names a submodule: an edge to it, not to the package
            subs = [f"{mod}.{a.name}" for a in node.names]
            named = [m for m in subs if m in _FILES]
            out.update(named)
            if len(named) < len(subs):
                out.add(mod)
    return out


def _graph() -> Dict[str, Set[str]]:
    files = _FILES
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


_FILES.update({_module_name(p): p for p in ROOT.rglob("*.py")})


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    # Tarjan's strongly connected components; a component of size > 1 is a cycle.
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out




def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (function-level imports included): {cycles}"


def test_cycle_finder_finds_a_planted_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]


def test_every_part_has_a_layer() -> None:
    missing = sorted({_part(m) for m in _graph()} - set(LAYERS))
    assert not missing, f"give these parts of captum_gim a layer in LAYERS: {missing}"


def test_no_module_imports_from_a_layer_above() -> None:
    bad = []
    for mod, deps in _graph().items():
        mine = LAYERS.get(_part(mod))
        for d in deps:
            theirs = LAYERS.get(_part(d))
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{mod} (layer {mine}) imports {d} (layer {theirs})")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES}): split it"

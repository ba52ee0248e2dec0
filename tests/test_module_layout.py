"""The package's module graph: the client and server halves of training are their own
modules, and no import cycle runs through client, training and context.

Every ``from . import x`` / ``from .x import y`` counts, those inside functions
(lazy imports) included: a lazy cycle is still a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PKG = Path(__file__).resolve().parent.parent / "splitlearn_comm"


def local_imports(path: Path) -> Set[str]:
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
    return out


def graph() -> Dict[str, Set[str]]:
    mods = {p.stem for p in PKG.glob("*.py")}
    return {p.stem: {m for m in local_imports(p) if m in mods and m != p.stem}
            for p in PKG.glob("*.py") if p.stem != "__init__"}


def cycles_through(g: Dict[str, Set[str]], start: str) -> List[List[str]]:
    found: List[List[str]] = []

    def walk(node: str, path: List[str]) -> None:
        for nxt in sorted(g.get(node, ())):
            if nxt == start:
                found.append(path + [nxt])
            elif nxt not in path:
                walk(nxt, path + [nxt])

    walk(start, [start])
    return found


def test_no_import_cycle_through_client_training_and_context() -> None:
    g = graph()
    for mod in ("client", "training", "training_client", "context"):
        assert cycles_through(g, mod) == [], f"import cycle through {mod}"


def test_training_halves_are_separate_modules() -> None:
    g = graph()
    assert "client" not in g["training"] and "server" not in g["training"]
    assert "training" not in g["training_client"] and "client" not in g["training_client"]
    assert "server" not in g["training_client"]

"""The package has no import cycle: every import counts, module level, inside functions and under TYPE_CHECKING
(a deferred import hides a cycle from Python, not from a reader or a type checker)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "dllm_cli"


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in mods and d != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import() -> None:
    graph = {"a.bindings": {"a.library"}, "a.library": {"a.bindings"}, "a.model": {"a.library"}}
    assert _cycles(graph) == [["a.bindings", "a.library"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_scanner_sees_type_checking_and_function_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.y import T\n")
    (pkg / "y.py").write_text("def f():\n    from . import x\n")
    mods = _modules(pkg)
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert graph["p.x"] == {"p.y"} and graph["p.y"] == {"p.x"}
    assert _cycles(graph) == [["p.x", "p.y"]]


def test_dllm_cli_has_no_import_cycle() -> None:
    mods = _modules(ROOT)
    assert "dllm_cli.runtime.bindings" in mods and "dllm_cli.runtime.library" in mods
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    assert "dllm_cli.runtime.bindings" in graph["dllm_cli.runtime.library"]
    assert _cycles(graph) == []

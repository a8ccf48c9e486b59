"""The package's shape: every module in a layer that imports only the layers below it, no import
cycles between llmprune's modules (imports inside functions count), no module importing another
module's _private names, no test hook read by product code."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llmprune"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> imported llmprune module, and "module <- source.name" for each import of
    a _private name from another module."""
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if not src.startswith("llmprune"):
                    continue
                for alias in node.names:
                    full = f"{src}.{alias.name}"
                    target = full if full in mods else owner(src)
                    if target and target != mod:
                        edges[mod].add(target)
                    if (alias.name.startswith("_") and not alias.name.startswith("__")
                            and alias.name != "_native" and full not in mods and target != mod):
                        private.append(f"{mod} <- {full}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    target = owner(alias.name) if alias.name.startswith("llmprune") else None
                    if target and target != mod:
                        edges[mod].add(target)
    for m in edges:  # the package root only re-exports: importing it is not a dependency
        edges[m].discard("llmprune")
    edges.pop("llmprune", None)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_hand_made_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_and_no_private_reach_ins():
    edges, private = _imports(_modules())
    # imports at module level and inside functions are both seen
    assert {"llmprune.core.device", "llmprune.loaders"} <= edges["llmprune.runs.prune"]
    assert _cycles(edges) == []
    assert private == []


# The layers of docs/architecture.md, lowest first: a module may import its own package and the
# layers below its own, never a layer above it or another package of its own layer.
LAYERS = [
    ["llmprune.core"],
    ["llmprune.models", "llmprune.solvers"],
    ["llmprune.recipe"],
    ["llmprune.io"],
    ["llmprune.engine"],
    ["llmprune.sparse", "llmprune.structured", "llmprune.delta", "llmprune.evaluate",
     "llmprune.retrain"],
    ["llmprune.loaders"],
    ["llmprune.runs"],
    ["llmprune.api", "llmprune.runner", "llmprune.sweep", "llmprune.deprecated"],
    ["llmprune.cli"],
    ["llmprune.__main__"],
]


def _layer(module: str) -> tuple[int, str] | None:
    for i, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return i, package
    return None


def _violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer or sideways to another package of the same layer."""
    out = []
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            (lm, pm), (lt, pt) = _layer(m), _layer(t)
            if lt > lm or (lt == lm and pt != pm):
                out.append(f"{m} -> {t}")
    return out


def test_layer_checker_finds_upward_and_sideways_imports():
    assert _violations({"llmprune.io.export": {"llmprune.engine.calibrate", "llmprune.core.errors"},
                        "llmprune.sparse.linear": {"llmprune.delta.dare"},
                        "llmprune.runs.prune": {"llmprune.runs.streaming", "llmprune.io.meta"}}) == [
        "llmprune.io.export -> llmprune.engine.calibrate",
        "llmprune.sparse.linear -> llmprune.delta.dare"]


def test_every_module_imports_only_the_layers_below_it():
    edges, _ = _imports(_modules())
    unplaced = sorted(m for m in edges if _layer(m) is None)
    assert unplaced == []  # a new module belongs to a layer: add it to LAYERS
    assert _violations(edges) == []


def test_no_test_hooks_in_product_code():
    offenders = [str(p) for p in PKG.rglob("*.py") if "LLMPRUNE_TEST" in p.read_text()]
    assert offenders == []

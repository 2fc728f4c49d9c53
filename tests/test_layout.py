"""The package layout: infer_cli's and quantize's modules import each other without a circle
(counting the imports deferred into functions, which hide a circle without removing it), and no
module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infer_cli", "quantize")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _owner(name: str, mods) -> str | None:
    """The module of ours that ``name`` (a module or a name in one) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mods):
    """module -> {module it imports: [(line, imported name)]}, every import statement counted."""
    graph = {}
    for mod, path in mods.items():
        edges: dict[str, list] = {}
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _owner(alias.name, mods)
                    if target and target != mod:
                        edges.setdefault(target, []).append((node.lineno, alias.name))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in mods else _owner(base, mods)
                    if target and target != mod:
                        edges.setdefault(target, []).append((node.lineno, alias.name))
        graph[mod] = edges
    return graph


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_import_graph_has_no_circle():
    mods = _modules()
    assert "infer_cli.engine.scheduler" in mods and "quantize" in mods  # the walk found the tree
    graph = _imports(mods)
    assert sum(len(e) for e in graph.values()) > 100
    circles = _cycles(graph)
    detail = []
    for comp in circles:
        inside = set(comp)
        for m in comp:
            for target, where in sorted(graph[m].items()):
                if target in inside:
                    detail.append(f"{m} -> {target} (line {where[0][0]})")
    assert not circles, "import circles:\n" + "\n".join(detail)


def test_the_cycle_finder_finds_a_circle():
    # the check above can fail: a -> b -> c -> a is found, d hanging off it is not part of it
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": [], "d": []}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": []}, "b": {}}) == []


def test_no_module_uses_another_modules_private_names():
    mods = _modules()
    graph = _imports(mods)
    bad = []
    for mod, edges in graph.items():
        for target, names in edges.items():
            for line, name in names:
                leaf = name.rpartition(".")[2]
                if leaf.startswith("_") and not leaf.startswith("__"):
                    bad.append(f"{mod}:{line} imports {name} from {target}")
        # module._name, where module is one of ours imported under that name
        tree = ast.parse(mods[mod].read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        aliases[a.asname or a.name.partition(".")[0]] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in mods:
                        aliases[a.asname or a.name] = full
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != mod):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)

"""The import graph of dnc_ray, read with ast: every import counts (top level, inside a function, under
TYPE_CHECKING), so a circle hidden by a deferred import is still a circle. No circle; no import goes up a
layer of docs/architecture.md's table, read from the document itself (so the document stays true)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "dnc_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str, path: Path) -> set[str]:
    """The dnc_ray modules `name` imports (a package for `from pkg import x` unless x is a module of it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def documented_layers() -> list[tuple[str, list[str]]]:
    """(layer, its files and folders) from the `## Layers` table of docs/architecture.md, lowest first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n\n", 1)[0]
    layers = []
    for line in table.splitlines()[3:]:  # the heading line, the header row, the rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        layers.append((cells[0], re.findall(r"`([\w/.]+)`", cells[1])))
    return layers


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    path = MODULES[module].relative_to(PACKAGE).as_posix()
    for i, (_, places) in enumerate(layers):
        if any(path == p or (p.endswith("/") and path.startswith(p)) for p in places):
            return i
    return None


def test_the_walker_sees_every_kind_of_import():
    """Top-level, deferred (in a function) and TYPE_CHECKING imports, and `from pkg import module`."""
    assert "dnc_ray.stages.generate" in GRAPH["dnc_ray.cli"]  # deferred: the CLI imports a command's module when run
    assert "dnc_ray.tasks" in GRAPH["dnc_ray.method.run"]  # under TYPE_CHECKING
    assert "dnc_ray.infra.storage" in GRAPH["dnc_ray.tasks.common"]  # from dnc_ray.infra import storage
    assert sum(map(len, GRAPH.values())) > 150


def test_no_import_circle():
    assert circles(GRAPH) == []


def test_a_circle_is_found():
    """The circle finder itself: a -> b -> c -> a (and d apart) is one circle."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_goes_up_a_layer_and_every_module_has_one():
    layers = documented_layers()
    assert [name for name, _ in layers][:3] == ["infra", "tasks, metrics", "llm"]
    unplaced = sorted(m for m in MODULES if m != "dnc_ray" and layer_of(m, layers) is None)
    assert unplaced == [], "modules in no layer of docs/architecture.md"
    upward = sorted(
        f"{m} ({layers[layer_of(m, layers)][0]}) -> {t} ({layers[layer_of(t, layers)][0]})"
        for m, targets in GRAPH.items() if m != "dnc_ray"
        for t in targets if t != "dnc_ray" and layer_of(t, layers) > layer_of(m, layers)
    )
    assert upward == []

"""The house keeps its data-flow order: no module imports a higher layer, and no two modules
import each other (directly or through others, imports inside functions included).

Layers (DESIGN.md, "The house"), lowest first. A new package goes into this table when it lands.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megacpp_mcore"

LAYERS = [
    {"errors", "paths", "jsonio", "supported"},
    {"layout"},
    {"symbols", "settings"},
    {"plan"},
    {"ops", "backend", "cpu_support", "distributed"},
    {"layers"},
    {"specs"},
    {"model", "receipt"},
    {"train"},
    {"plasticity", "stp"},
    {"features", "megatron"},
    {"cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "megacpp_mcore" else None


def _edges() -> set[tuple[str, str, str]]:
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts == ("__init__",):
            continue
        unit = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = ([f"{node.module}.{a.name}" for a in node.names]
                           if node.module == "megacpp_mcore" else [node.module])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                other = _unit(target)
                if other and other != unit and other != "__version__":
                    edges.add((unit, other, str(rel)))
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and
                                                                 (p / "__init__.py").exists())}
    assert units <= set(RANK), f"put these in LAYERS: {sorted(units - set(RANK))}"


def test_no_import_points_upward():
    upward = [f"{where} ({a}, layer {RANK[a]}) imports {b} (layer {RANK[b]})"
              for a, b, where in _edges() if RANK[b] > RANK[a]]
    assert not upward, "\n".join(sorted(upward))


# --------------------------------------------------------------------------- import cycles


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    """Whether ``node`` sits under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
            if name == "TYPE_CHECKING":
                return True
    return False


def _module_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def resolve(target: str) -> str | None:
        while target and target not in files:  # 'pkg.mod.func' -> 'pkg.mod'
            target = target.rpartition(".")[0]
        return target or None

    for name, path in files.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            if _type_checking_only(node, parents):
                continue
            for target in targets:
                if target.split(".")[0] != "megacpp_mcore":
                    continue
                other = resolve(target)
                if other and other != name:
                    graph[name].add(other)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    """No two modules of the package import each other, directly or through others, counting
    imports inside functions (only ``if TYPE_CHECKING:`` imports are left out): a circle is
    a module that cannot be read without the other, whichever one Python loads first."""
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]

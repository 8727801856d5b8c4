"""The house keeps its data-flow order: no module imports a higher layer, and there is no cycle.

Layers (DESIGN.md, "The house"), lowest first. A new package goes into this table when it lands.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megacpp_mcore"

LAYERS = [
    {"errors", "paths", "jsonio"},
    {"layout"},
    {"symbols", "settings"},
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

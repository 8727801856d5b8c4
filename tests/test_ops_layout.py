"""``megacpp_mcore/ops`` keeps flash-linear-attention's layout (``ops/__init__.py`` describes
it): one folder per op, files named by role, an oracle that imports nothing it checks, and no
import cycle. Also: the shared comparison helpers (``tests/compare.py``) fail on a difference."""

import ast
from pathlib import Path

import pytest
import torch

from tests.compare import assert_close, assert_close_rel, compare_outputs_and_grads

OPS = Path(__file__).resolve().parents[1] / "megacpp_mcore" / "ops"
ROLES = {"__init__", "naive", "reference", "fused", "checks", "dispatch"}
#: what an oracle may import: the standard maths and torch, nothing of the package
ORACLE_IMPORTS = {"__future__", "math", "torch"}
#: role -> how its entry point is named (``naive_<fn>``, ``<fn>_reference``, ``<fn>_fused``)
FUNCTION_NAMES = {"naive": lambda n: n.startswith("naive_"),
                  "reference": lambda n: n.endswith("_reference"),
                  "fused": lambda n: n.endswith("_fused")}


def _imports(tree: ast.AST, package: str) -> list[str]:
    """Every module a file imports, at any depth (inside functions too); relative imports
    resolved against ``package``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append(module)
            found += [f"{module}.{a.name}" for a in node.names]  # `from pkg import module`
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(OPS.parents[1]).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_one_folder_per_op_with_files_named_by_role():
    loose = sorted(p.name for p in OPS.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"ops/ holds only op folders; move {loose} into ops/<op>/"
    folders = {p.name: p for p in OPS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert set(folders) == {"m2rnn", "mamba3", "ssd", "stp"}
    for name, folder in folders.items():
        files = {p.stem for p in folder.glob("*.py")}
        assert {"__init__", "naive"} <= files, f"ops/{name} needs __init__.py and naive.py"
        assert files <= ROLES, f"ops/{name}: {sorted(files - ROLES)} is not a role ({ROLES})"
        for role, named in FUNCTION_NAMES.items():
            path = folder / f"{role}.py"
            if not path.exists():
                continue
            public = [n.name for n in ast.parse(path.read_text()).body
                      if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
            assert any(map(named, public)), f"ops/{name}/{role}.py defines {public}"


def test_op_packages_hold_no_code():
    """An op's ``__init__.py`` is its documentation: importing one file of the op (its
    oracle, say) must not import the others."""
    for path in OPS.glob("*/__init__.py"):
        body = ast.parse(path.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), path.relative_to(OPS)


@pytest.mark.parametrize("path", sorted(OPS.glob("*/naive.py")),
                         ids=lambda p: p.parent.name)
def test_oracle_imports_nothing_it_checks(path):
    imported = _imports(ast.parse(path.read_text()), _module_name(path.parent))
    roots = {m.split(".")[0] for m in imported}
    assert roots <= ORACLE_IMPORTS, (
        f"ops/{path.parent.name}/naive.py imports {sorted(set(imported))}: an oracle imports "
        f"only {sorted(ORACLE_IMPORTS)}, never the code it checks")


def test_every_op_has_an_oracle():
    assert {p.parent.name for p in OPS.glob("*/naive.py")} == {"m2rnn", "mamba3", "ssd", "stp"}


def test_the_oracle_check_catches_a_package_import(tmp_path):
    for line in ("from megacpp_mcore.ops.mamba3.reference import rotate_pairs",
                 "from .reference import rotate_pairs", "from . import reference",
                 "def f():\n    import megacpp_mcore.ops.ssd.reference"):
        imported = _imports(ast.parse(line), "megacpp_mcore.ops.mamba3")
        assert not {m.split(".")[0] for m in imported} <= ORACLE_IMPORTS, line


def test_ops_have_no_import_cycle():
    """Among ops' modules, imports inside functions included, there is no cycle."""
    paths = {_module_name(p): p for p in OPS.rglob("*.py")}
    graph = {name: {m for m in _imports(ast.parse(path.read_text()), name if
                                        path.name == "__init__.py" else name.rpartition(".")[0])
                    if m in paths and m != name}
             for name, path in paths.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert graph["megacpp_mcore.ops.mamba3.reference"] == {"megacpp_mcore.ops.ssd.reference"}


def test_comparison_helpers_fail_on_a_difference():
    a = torch.ones(4, dtype=torch.float64)
    assert assert_close_rel(a, a, 1e-12, "same") == 0.0
    with pytest.raises(AssertionError, match=r"off: relative error 5\.00e-01 >= 1e-01"):
        assert_close_rel(a * 1.5, a, 1e-1, "off")
    with pytest.raises(AssertionError, match="off"):
        assert_close(a + 1e-6, a, rtol=1e-9, atol=1e-9, what="off")
    x = torch.randn(3, 2, dtype=torch.float64)
    compare_outputs_and_grads(torch.sin, lambda t: torch.sin(t.clone()), [x], ("y", "dx"),
                              rtol=0, atol=0)
    # same outputs, a wrong gradient: the gradient comparison must catch it
    wrong = lambda t: torch.sin(t.detach()) + 0.5 * (t - t.detach())  # noqa: E731
    with pytest.raises(AssertionError, match="dx"):
        compare_outputs_and_grads(torch.sin, wrong, [x], ("y", "dx"), rtol=1e-9, atol=1e-9)
    with pytest.raises(AssertionError, match="dx"):
        compare_outputs_and_grads(torch.sin, wrong, [x], ("y", "dx"), limit=1e-6)

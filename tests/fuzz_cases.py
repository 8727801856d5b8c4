"""Fuzz properties shared by ``tests/test_fuzz.py`` (a few hundred cases in CI) and
``scripts/fuzz.py`` (10,000 by default): every generated input to a door of the project
either works or raises the project's own error (:class:`MegacppError`), never anything else.

Doors: recipe files (random text, random bytes, and the tiny recipe with random keys set to
random values), ``--set`` overrides, patterns with depths, and receipts (random bytes, and a
valid receipt with random fields replaced) through loading, ``show``, ``compare`` and the
train command's summary. No model is built: these are the input-handling paths.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacpp_mcore.errors import MegacppError
from megacpp_mcore.paths import RECIPES_DIR

# --------------------------------------------------------------------------- values


def _recipe_key_paths() -> list[str]:
    """Every key path of a recipe (``model.moe.top_k``), from the typed settings."""
    from megacpp_mcore.settings.recipe import Recipe

    paths: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("key", True) or (cls is Recipe and f.name == "name"):
                continue
            tp = hints[f.name]
            path = f"{prefix}{f.name}"
            paths.append(path)
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{path}.")

    walk(Recipe, "")
    return paths


KEY_PATHS = _recipe_key_paths()
#: values that sit on the edges of the checks, plus the strings recipes use
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 257, 512, 4096, 4097, 10**9, 2**63, 0.5, 1e-12,
               1e308, "auto", "te", "local", "bf16", "fp16", "fp32", "cosine", "AEM", "A|E",
               "AEM/MA", "R", "G", "tiny", "nam56r", "path", "mock", "embedded", "byte",
               "98,2,0", "", "swiglu", "squared_relu", "RMSNorm", "rope", "alltoall", "none"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(INTERESTING),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)
key_paths = st.one_of(
    st.sampled_from(KEY_PATHS),
    st.sampled_from(KEY_PATHS).map(lambda p: p + ".x"),
    st.text(alphabet="abcdefgh_.", min_size=1, max_size=12),
)
YAML_ALPHABET = [*"AEMFRG|/:-[]{}&*!>'\"#,?.%@`\\\t\n 0123456789abeflnrstuxy", "\x00", "é",
                 "\ufeff"]


def _tiny() -> dict:
    return yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())


TINY = _tiny()


def _set_path(data: dict, path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


# --------------------------------------------------------------------------- properties


def works_or_refuses(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, or None where it raised a MegacppError; anything else propagates."""
    try:
        return fn(*args)
    except MegacppError as err:
        assert str(err), "a refusal must say what was wrong"
        return None


def check_recipe_bytes(folder: Path, content: bytes) -> None:
    from megacpp_mcore.settings.recipe import load_recipe

    path = folder / "fuzz.yaml"
    path.write_bytes(content)
    works_or_refuses(load_recipe, path)


def check_recipe_text(folder: Path, text: str) -> None:
    check_recipe_bytes(folder, text.encode("utf-8", "surrogatepass"))


def check_recipe_mutation(folder: Path, case: tuple[list, bool]) -> None:
    """The tiny recipe with random keys set to random values (or deleted)."""
    changes, drop_pattern = case
    data = copy.deepcopy(TINY)
    for path, value in changes:
        _set_path(data, path, value)
    if drop_pattern:
        data.pop("pattern", None)
    check_recipe_text(folder, _dump(data))


def check_overrides(folder: Path, overrides: list[str]) -> None:
    from megacpp_mcore.settings.recipe import load_recipe

    recipe = works_or_refuses(load_recipe, "tiny", overrides)
    if recipe is not None:
        recipe.to_dict()
        _ = recipe.recipe_hash


def check_pattern(folder: Path, case: tuple[str, Any]) -> None:
    from megacpp_mcore.layout import resolve

    pattern, depth = case
    layout = works_or_refuses(resolve, pattern, depth)
    if layout is not None:
        assert resolve(layout.canonical) == layout
        layout.to_json()


def _good_receipt(folder: Path) -> dict:
    from megacpp_mcore.receipt import Receipt

    r = Receipt.create(folder / "good.json", run_id="good", recipe_name="tiny",
                       recipe_hash="ab" * 32, layout="AEMFRA", versions={"torch": "2"},
                       parallel={"tensor": 1}, write=False)
    r.add_feature("stp", 10, {"weight": 0.1}, write=False)
    r.add_events([{"step": 10, "kind": "fire", "touched": 3, "seconds": 0.1}], write=False)
    for step in (10, 20, 30):
        r.log_interval(step, loss=3.0 / step, aux_losses={"load_balancing": 0.1}, lr=1e-3,
                       tokens_per_s=1000.0, mfu=0.3, peak_memory_bytes=2**30,
                       goodput={"compute": 1.0, "data_wait": 0.5}, write=False)
    return r.data


def _json_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _json_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _json_paths(value, (*prefix, i))
    return out


GOOD_RECEIPT = _good_receipt(Path("/nonexistent"))
RECEIPT_PATHS = [p for p in _json_paths(GOOD_RECEIPT) if p]


def _read_receipt(path: Path) -> None:
    from megacpp_mcore.cli.train import summary
    from megacpp_mcore.jsonio import jsonable
    from megacpp_mcore.receipt import Receipt, load_receipt
    from megacpp_mcore.receipt.analysis import (
        compare_receipts,
        format_comparison,
        format_receipt,
    )

    receipt = load_receipt(path)
    good = Receipt(path.with_name("good.json"), copy.deepcopy(GOOD_RECEIPT))
    format_receipt(receipt)
    summary(receipt)
    json.dumps(receipt.data)
    for a, b in ((good, receipt), (receipt, good), (receipt, receipt)):
        json.dumps(jsonable(compare_receipts(a, b)))
        format_comparison(a, b)


def check_receipt_bytes(folder: Path, content: bytes) -> None:
    path = folder / "fuzz.json"
    path.write_bytes(content)
    works_or_refuses(_read_receipt, path)


def check_receipt_mutation(folder: Path, changes: list[tuple[int, bool, Any]]) -> None:
    """A valid receipt with random fields replaced by random JSON values (or deleted)."""
    data = copy.deepcopy(GOOD_RECEIPT)
    for index, delete, value in changes:
        path = RECEIPT_PATHS[index % len(RECEIPT_PATHS)]
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if delete and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the parent
    check_receipt_bytes(folder, json.dumps(data).encode())


# --------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["nan", "inf", "-inf", 10**5000 // 10**4990, -1, 0, True]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=5,
)
set_values = st.one_of(
    st.text(alphabet=YAML_ALPHABET, max_size=20),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)

PROPERTIES: dict[str, tuple[Callable[[Path, Any], None], st.SearchStrategy]] = {
    "recipe_text": (check_recipe_text, st.text(alphabet=YAML_ALPHABET, max_size=200)),
    "recipe_bytes": (check_recipe_bytes, st.binary(max_size=200)),
    "recipe_mutation": (check_recipe_mutation, st.tuples(
        st.lists(st.tuples(key_paths, values), min_size=1, max_size=4), st.booleans())),
    "set_overrides": (check_overrides, st.lists(
        st.one_of(st.tuples(key_paths, set_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
                  st.text(max_size=20)), min_size=1, max_size=3)),
    "pattern": (check_pattern, st.tuples(
        st.one_of(st.text(alphabet="AEMFRGaemx|/ -*\n", max_size=40),
                  st.sampled_from(["nam56r", "nam52", "tiny", "tiny_pp", "NAM56R", "nam99"])),
        st.one_of(st.none(), st.integers(-5, 200), st.sampled_from([4096, 4097, 10**12]),
                  st.booleans(), st.floats(), st.text(max_size=3)))),
    "receipt_bytes": (check_receipt_bytes, st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        json_values.map(lambda v: json.dumps({"kind": "megacpp-receipt", "schema_version": 1,
                                              "run": v}).encode()))),
    "receipt_mutation": (check_receipt_mutation, st.lists(
        st.tuples(st.integers(0, 10**6), st.booleans(), json_values), min_size=1, max_size=4)),
}


def property_test(name: str, folder: Path, max_examples: int,
                  counter: list[int] | None = None) -> Callable[[], None]:
    """The named property as a hypothesis test over ``max_examples`` cases; calling it runs
    them (and raises, with hypothesis's falsifying example in its notes, on a failure)."""
    check, strategy = PROPERTIES[name]

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case: Any) -> None:
        if counter is not None:
            counter[0] += 1
        check(folder, case)

    return run

"""Module specs as plain trees (classes by name, recursively), to pin what the spec builders
build: ``tests/assets/spec_trees.json`` records them for every family, variant and backend.

Transformer Engine's classes are named by their name in Megatron's TE extension module
(``TE:TENorm``), matched by identity: without TE installed Megatron puts placeholders there,
so the te trees are comparable on a CPU machine too.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from pathlib import Path

from megatron.core.transformer.spec_utils import ModuleSpec

GOLDEN = Path(__file__).parent / "assets" / "spec_trees.json"


def _te_names() -> dict[int, str]:
    from megatron.core.extensions import transformer_engine as te

    return {id(obj): name for name, obj in vars(te).items()
            if name.startswith("TE") and obj is not None}


def _name(obj, te_names) -> str:
    if id(obj) in te_names:
        return f"TE:{te_names[id(obj)]}"
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None or qualname is None:
        return repr(obj)
    return f"{module}.{qualname}"


def tree(obj, te_names: dict[int, str] | None = None):
    """``obj`` (a spec, partial, submodules dataclass, class...) as JSON-able data."""
    te_names = _te_names() if te_names is None else te_names
    if id(obj) in te_names:  # first: TE's placeholders pass for str instances
        return _name(obj, te_names)
    if isinstance(obj, ModuleSpec):
        out = {"module": tree(obj.module, te_names)}
        if obj.params:
            out["params"] = tree(obj.params, te_names)
        if obj.submodules is not None:
            out["submodules"] = tree(obj.submodules, te_names)
        if obj.metainfo:
            out["metainfo"] = tree(obj.metainfo, te_names)
        return out
    if isinstance(obj, functools.partial):
        return {"partial": tree(obj.func, te_names), "args": tree(list(obj.args), te_names),
                "keywords": tree(obj.keywords, te_names)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"dataclass": _name(type(obj), te_names),
                "fields": {f.name: tree(getattr(obj, f.name), te_names)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {str(k): tree(v, te_names) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tree(v, te_names) for v in obj]
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__name__}.{obj.name}"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return _name(obj, te_names)


def attempt(build, *args):
    """The tree of ``build(*args)``, or the error it raises (type and message): a refusal
    is part of what is pinned."""
    try:
        return tree(build(*args))
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def normalised(data):
    return json.loads(json.dumps(data))


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text())

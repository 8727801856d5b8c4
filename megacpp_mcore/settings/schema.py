"""The one type engine of the settings: how a field's value is read, checked and described.

Every settings section is a frozen dataclass deriving from :class:`Section`; its fields are
written once, with their type, default, doc and check:

* the doc is the string literal right under the field (an attribute docstring, as Megatron's
  ``TransformerConfig`` and torchtitan's configs write them), read by :func:`field_docs`
  with ``ast`` over the class source, as Megatron's ``ArgumentGroupFactory`` does;
* the check is the field's type: exact types (``True`` is not an integer), literals take
  only their listed values, a tuple is a list of checked items, and a range is an
  ``Annotated`` alias such as :data:`NonNegativeInt` (``Annotated[int, NON_NEGATIVE]``).
  Without one, the default rule holds: integers >= 1, numbers finite.

:class:`Section`'s ``__post_init__`` runs :func:`coerce` on every field, so every
construction path (a YAML recipe, a ``--set`` override, Python code, Megatron's args read
back by the ``--spec`` seam) is checked by the same code and normalised the same way (lists
become tuples, integers become floats where the field is a number). A failure is a
:class:`FieldError` (a :class:`RecipeError`) naming the key path; the YAML loader prefixes
the file or ``--set`` that gave the value. Rules of one section that involve several of its
fields go in that section's ``__post_init__``; cross-section rules live in ``rules.py`` and
``sizes.py``. Pure Python: nothing here imports torch or Megatron.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

from megacpp_mcore.errors import RecipeError

# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Check:
    """A single-value rule of a field: ``rule`` is what messages show ("> 0"), ``ok``
    decides. Written on the field's type: ``Annotated[int, NON_NEGATIVE]``."""

    rule: str
    ok: Callable[[Any], bool]


POSITIVE = Check("a positive integer (>= 1)", lambda v: v >= 1)
NON_NEGATIVE = Check(">= 0", lambda v: v >= 0)
GREATER_THAN_ZERO = Check("> 0", lambda v: v > 0)
UNIT = Check("in [0, 1)", lambda v: 0.0 <= v < 1.0)
UNIT_OPEN_LOW = Check("in (0, 1]", lambda v: 0 < v <= 1)
CLIP = Check(">= 0 (0 disables clipping)", lambda v: v >= 0)

#: an integer >= 0 (a count that may be zero, a seed)
NonNegativeInt = Annotated[int, NON_NEGATIVE]
#: a number >= 0 (a loss weight, a decay)
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
#: a number > 0 (a learning rate, an epsilon, a standard deviation)
PositiveFloat = Annotated[float, GREATER_THAN_ZERO]
#: a number in [0, 1) (a dropout, an Adam beta, a threshold)
UnitFloat = Annotated[float, UNIT]
#: a number in (0, 1] (an EMA weight, a smallest scale)
UnitOpenLowFloat = Annotated[float, UNIT_OPEN_LOW]
#: the gradient-norm clip (0 disables it)
ClipFloat = Annotated[float, CLIP]


class FieldError(RecipeError):
    """A field's value is refused: ``path`` (``model.moe.top_k``, ``stp.layers[0]``), the
    ``problem`` and what is ``accepted`` (None: the problem says it)."""

    def __init__(self, path: str, problem: str, accepted: str | None = None) -> None:
        self.path, self.problem, self.accepted = path, problem, accepted
        super().__init__(f"{path}: {problem}" + (f"; accepted: {accepted}" if accepted else ""))

    @property
    def key(self) -> str:
        """The setting's key path (a list item's path names its list)."""
        return self.path.partition("[")[0]


# --------------------------------------------------------------------------- types


def _split(tp: Any) -> tuple[Any, Check | None]:
    """``Annotated[T, check]`` -> ``(T, check)``; anything else -> ``(tp, None)``."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        return base, next((m for m in meta if isinstance(m, Check)), None)
    return tp, None


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(tp)
    )


def strip_optional(tp: Any) -> Any:
    """``T | None`` -> ``T`` (anything else unchanged)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def scalar_type(tp: Any) -> Any:
    """The plain type of a field's value or list item: no null, no range annotation."""
    return _split(strip_optional(_split(tp)[0]))[0]


@cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass (``Annotated`` kept)."""
    return typing.get_type_hints(cls, include_extras=True)


def key_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are recipe keys (not the loader's bookkeeping: ``metadata key False``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def describe_type(tp: Any) -> str:
    """What a value of type ``tp`` looks like in a recipe, for messages and ``describe``."""
    tp = _split(tp)[0]
    if _is_optional(tp):
        return f"{describe_type(strip_optional(tp))}, or null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = _split(typing.get_args(tp)[0])[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(
            item, describe_type(item))
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys: " + ", ".join(f.name for f in key_fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def show(value: Any) -> str:
    """A value as messages name it: ``a boolean (true)``, ``a list ([1, 2])``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return f"a list ({list(value)!r})"
    return f"{type(value).__name__} ({value!r})"


def plain(value: Any) -> Any:
    """Sections as mappings and tuples as lists (JSON/YAML-ready)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in key_fields(type(value))}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- checking


def range_problem(value: Any, check: Check | None) -> str | None:
    """Why the number ``value`` is out of range, or None: numbers must be finite, and
    ``check`` holds or, without one, integers are >= 1. Other values have no range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if check is None:
        if isinstance(value, int) and value < 1:
            return f"must be {POSITIVE.rule}, got {value}"
        return None
    if not check.ok(value):
        return f"must be {check.rule}, got {value!r}"
    return None


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked (strictly) against the field type ``tp``, normalised (a list is a
    tuple, an integer for a number a float); raises :class:`FieldError` naming ``path``."""
    tp, check = _split(tp)
    if _is_optional(tp):
        if value is None:
            return None
        inner = strip_optional(tp)
        try:
            return coerce(value, inner, path)
        except FieldError as err:
            if err.accepted and not dataclasses.is_dataclass(inner):
                raise FieldError(err.path, err.problem, describe_type(tp)) from None
            raise
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise FieldError(path, f"expected a {tp.__name__}, got {show(value)}")
        return value
    if value is None:
        raise FieldError(path, "null is not allowed here", describe_type(tp))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. a step number or a phase name
        own_kind = None  # the complaint of the member of the value's own kind says most
        for member in typing.get_args(tp):
            try:
                return coerce(value, member, path)
            except FieldError as err:
                literal = typing.get_origin(member) is Literal
                kinds = {type(a) for a in typing.get_args(member)} if literal else {
                    _split(member)[0]}
                own_kind = err if type(value) in kinds else own_kind
        if own_kind is not None:
            raise FieldError(path, own_kind.problem, describe_type(tp))
        raise FieldError(path, f"got {show(value)}", describe_type(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise FieldError(path, f"got {show(value)}", describe_type(tp))
        return value
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            raise FieldError(path, f"expected a list, got {show(value)}", describe_type(tp))
        return tuple(coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:  # pragma: no cover - a field of a type this engine does not know
        raise FieldError(path, f"unsupported field type {tp!r}")
    if not ok:
        raise FieldError(path, f"expected {describe_type(tp)}, got {show(value)}",
                         describe_type(tp))
    if tp is float:
        value = float(value)
    problem = range_problem(value, check)
    if problem:
        raise FieldError(path, problem)
    return value


class Section:
    """Base of every settings section: ``__post_init__`` checks and normalises each field
    with :func:`coerce` (``PREFIX`` is the section's key path, for messages)."""

    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        tps = hints(type(self))
        for f in key_fields(self):
            path = f"{self.PREFIX}.{f.name}" if self.PREFIX else f.name
            value = getattr(self, f.name)
            checked = coerce(value, tps[f.name], path)
            if checked is not value:
                object.__setattr__(self, f.name, checked)


# --------------------------------------------------------------------------- docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` from the attribute docstrings of ``cls`` (and its dataclass bases):
    the string literal right under each annotated field, whitespace collapsed."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - a class without source
        return docs
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    for field_node, doc_node in zip(node.body, node.body[1:], strict=False):
        if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                and isinstance(doc_node, ast.Expr) and isinstance(doc_node.value, ast.Constant)
                and isinstance(doc_node.value.value, str)):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


__all__ = [
    "CLIP",
    "GREATER_THAN_ZERO",
    "NON_NEGATIVE",
    "POSITIVE",
    "UNIT",
    "UNIT_OPEN_LOW",
    "Check",
    "ClipFloat",
    "FieldError",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "Section",
    "UnitFloat",
    "UnitOpenLowFloat",
    "coerce",
    "describe_type",
    "field_docs",
    "hints",
    "key_fields",
    "plain",
    "range_problem",
    "scalar_type",
    "show",
    "strip_optional",
]

"""Recipes: typed, validated training settings, loaded from ``recipes/*.yaml``.

A recipe is one YAML mapping whose keys are the fields of :class:`Recipe`: the layer
``pattern`` (a literal or a family from ``patterns/``), its ``depth``, ``mtp_depths``,
``backend``, ``r_lowering``, and one section per settings dataclass of
:mod:`megacpp_mcore.settings.config` (``model``, ``precision``, ``parallel``, ``training``,
``data``, ``logging``). Loading is strict, and every rejection is a :class:`RecipeError`
that names the file, the key path (``model.moe.top_k``), what was wrong and what is accepted:

* unknown sections and keys are errors (never silently ignored), and so are duplicate keys;
* types are exact: ``true`` is not an integer, ``1`` is not a boolean, an integer is accepted
  where a number (float) is expected; literals accept only their listed values. Numbers in
  exponent form without a dot (``3e-4``) are read as numbers (YAML 1.2), not as strings;
* impossible values (non-positive sizes, dropouts outside [0, 1), ...) are refused;
* cross-field rules (sizes vs the layout and the parallel split, pipeline stages, precision,
  batch sizes, data) are checked after the whole recipe is resolved, only for the block
  families the layout uses (see :func:`recipe_problems`).

``base: other.yaml`` (relative to the recipe's folder) deep-merges the recipe over another
one (chains are allowed, cycles are errors); command-line overrides (``--set
model.hidden_size=2048``, values read as YAML scalars) are applied last, with the same checks.
Every field is documented once, in its dataclass's docstring ``Attributes`` list;
``megacpp recipe describe`` prints them from there. Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Literal

import yaml

from megacpp_mcore.errors import PatternError, RecipeError
from megacpp_mcore.jsonio import content_hash
from megacpp_mcore.layout import FAMILIES, Layout, known_families, parse_pattern, resolve
from megacpp_mcore.paths import RECIPES_DIR, REPO_ROOT
from megacpp_mcore.settings.attention import LATENT, attention_problems, used_variants
from megacpp_mcore.settings.config import (
    SEQ_LENGTH_CHANGE,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PlasticityConfig,
    PrecisionConfig,
    StpConfig,
    TrainingConfig,
    check_fields,
    fire_phase_steps,
)
from megacpp_mcore.settings.sizes import size_problems
from megacpp_mcore.settings.table import value_problem

BACKENDS = ("auto", "te", "local")
#: letters an R layer may be lowered to for the native target (every stock Megatron family).
R_LOWERINGS = ("M", "A", "F", "E", "G")
#: the key that names a base recipe; consumed while loading, never a Recipe field.
BASE_KEY = "base"
#: smallest vocabulary of the byte tokenizer: 256 byte values + end-of-document
#: (megacpp_mcore.train.data.VOCAB_SIZE; kept here so recipes stay import-light).
BYTE_VOCAB_SIZE = 257


@dataclass(frozen=True)
class Recipe:
    """A training recipe: the layout, the model, and how it is trained.

    Attributes:
        name: the recipe's name: its file name without .yaml (not a key in the file).
        description: free text shown by ``megacpp recipe show``.
        pattern: a pattern family from patterns/ (e.g. nam56r) or a literal pattern such as
            AEMEAEMEAEMR; '|' splits pipeline stages, '/' starts multi-token-prediction parts.
        depth: main-decoder layers to tile the pattern to; null means the family's depth, or
            the literal pattern's own length.
        mtp_depths: number of multi-token-prediction depths. The MTP layers themselves come
            from the pattern's '/' parts (PATTERN/MTP/MTP: one identical part per depth), so
            mtp_depths must equal the number of '/' parts: 0 for a pattern without '/'. It is
            a declared count that the pattern is checked against, never a way to add MTP
            layers the pattern does not spell out.
        backend: auto (Transformer Engine where it is usable, else local), te (Transformer
            Engine, refused where unavailable) or local (Megatron's local modules and torch).
        r_lowering: null, or the letter (M, A, F, E or G) that every R layer is lowered to
            for the native Megatron target, which has no recurrent layer. Never implicit:
            without it a native translation of a layout with R is refused. The plugin target
            ignores it (the plugin builds R).
        model: the model section (shape and one sub-section per block family).
        precision: the precision section.
        parallel: the parallel section.
        training: the training schedule and optimizer section.
        data: the data section.
        logging: the logging and receipts section.
        stp: the STP auxiliary-loss section (trajectory straightening; off by default).
        plasticity: the plasticity section (FIRE, DASH, ReDo; plugin only).
        source: where the recipe was loaded from (set by the loader; not a key).
        overrides: the --set overrides applied on top of the file (set by the loader; not a
            key).
    """

    name: str
    pattern: str
    description: str = ""
    depth: int | None = None
    mtp_depths: int = 0
    backend: Literal["auto", "te", "local"] = "auto"
    r_lowering: Literal["M", "A", "F", "E", "G"] | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stp: StpConfig = field(default_factory=StpConfig)
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    source: str = field(default="", compare=False, metadata={"key": False})
    overrides: tuple[str, ...] = field(default=(), compare=False, metadata={"key": False})

    def __post_init__(self) -> None:
        check_fields(self, "")
        problems = recipe_problems(self)
        if problems:
            raise RecipeError(
                f"{self.where}: the recipe is inconsistent:\n  - " + "\n  - ".join(problems)
            )

    @property
    def where(self) -> str:
        """The recipe's origin for messages: its file (and the --set overrides, if any)."""
        where = self.source or f"recipe {self.name!r}"
        if self.overrides:
            where += " with " + " ".join(f"--set {o}" for o in self.overrides)
        return where

    @cached_property
    def layout(self) -> Layout:
        """The validated layer layout (pattern tiled to depth, stages, MTP parts)."""
        return resolve(self.pattern, self.depth)

    @cached_property
    def lowered_layout(self) -> Layout:
        """The layout with every R replaced by ``r_lowering`` (the layout itself if unset)."""
        if self.r_lowering is None:
            return self.layout
        return parse_pattern(self.layout.canonical.replace("R", self.r_lowering))

    def to_dict(self) -> dict[str, Any]:
        """Every recipe key with its resolved value (JSON/YAML-ready; no source/overrides)."""
        return _plain({f.name: getattr(self, f.name) for f in _key_fields(Recipe)})

    @cached_property
    def recipe_hash(self) -> str:
        """sha256 of the fully resolved recipe (see :func:`resolved_for_hash`)."""
        return content_hash(resolved_for_hash(self))


def resolved_for_hash(recipe: Recipe) -> dict[str, Any]:
    """What the recipe hash covers: every setting, with the pattern fully expanded.

    The name, description, source file and overrides are left out (the same settings under
    another file name hash the same), and ``pattern``/``depth`` are replaced by the expanded
    canonical layout, so a family name and its literal spelling hash the same. Hashed as
    sorted, compact JSON (``receipt.content_hash``).
    """
    data = recipe.to_dict()
    for key in ("name", "description"):
        data.pop(key)
    data["pattern"] = recipe.layout.canonical
    data["depth"] = recipe.layout.depth
    return data


# --------------------------------------------------------------------------- docs from docstrings


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: documentation}`` from the ``Attributes:`` list of ``cls``'s docstring."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    item_indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if item_indent is None:
            item_indent = indent
        if indent < item_indent:
            break
        match = re.match(r"(\w+):\s*(.*)", line.strip())
        if indent == item_indent and match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] += " " + line.strip()
    return docs


# --------------------------------------------------------------------------- schema helpers


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _key_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def _file_keys(cls: type) -> list[str]:
    """The keys a recipe file may hold at the level of ``cls``."""
    names = [f.name for f in _key_fields(cls)]
    if cls is Recipe:
        names.remove("name")  # from the file name
        names.insert(0, BASE_KEY)
    return names


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(tp)
    )


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def describe_type(tp: Any) -> str:
    """What a value of type ``tp`` looks like in a recipe, for messages and ``describe``."""
    if _is_optional(tp):
        return f"{describe_type(_strip_optional(tp))}, or null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(
            item, describe_type(item))
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys: " + ", ".join(_file_keys(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _show(value: Any) -> str:
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


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _key_fields(type(value))}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- YAML


#: largest recipe file read (shipped recipes are about 2 KB): a wrong file fails fast.
MAX_RECIPE_BYTES = 1 << 20
#: deepest nesting of mappings/lists in a recipe (recipes use three levels: model.moe.top_k);
#: bounds the YAML composer's recursion, so a file of 10,000 '[' is an error, not a crash.
MAX_YAML_DEPTH = 32


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 numbers (``3e-4`` is a float), no duplicate keys, no aliases
    and at most :data:`MAX_YAML_DEPTH` levels of nesting.

    Aliases (``*name``) are refused outright: recipes never need them, and a few lines of
    nested aliases (a "billion laughs" file) expand to billions of nodes in whatever walks
    the result. Refusing them at composition keeps loading in bounded memory and time.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nesting = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None,
                f"alias *{event.anchor}: aliases are not accepted in recipes (write the value "
                "out, or use 'base:' to share settings between recipes)", event.start_mark)
        self._nesting += 1
        try:
            if self._nesting > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels (recipes use 3)",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._nesting -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain name, not a list or mapping",
                key_node.start_mark)
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, origin: str) -> Any:
    """YAML text to Python with the recipe loader; errors name ``origin``."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"{origin}: not valid YAML: {err}") from None


def read_recipe_text(path: Path, origin: str) -> str:
    """A recipe file's text: at most :data:`MAX_RECIPE_BYTES`, strict UTF-8 (a leading BOM
    is dropped); anything else is a :class:`RecipeError` naming ``origin``."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{origin}: {size} bytes is too large for a recipe (at most "
                              f"{MAX_RECIPE_BYTES}; recipes are small YAML files)")
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{origin}: cannot read the recipe: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"{origin}: not a UTF-8 text file (byte {data[err.start]:#04x} at offset "
            f"{err.start}); a recipe is YAML text") from None
    return text.removeprefix("\ufeff")


# --------------------------------------------------------------------------- loading


def known_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/``."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or a name of ``recipes/`` (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = RECIPES_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and candidate.is_file():
        return candidate
    raise RecipeError(
        f"no recipe {str(name_or_path)!r}: not a file, nor a recipe in recipes/; known "
        f"recipes: {', '.join(known_recipes()) or '(none)'}"
    )


def _display(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _read_chain(path: Path) -> list[tuple[str, dict]]:
    """The recipe and its bases, root base first: ``[(display name, mapping), ...]``."""
    chain: list[tuple[str, dict]] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        resolved = current.resolve()
        shown = _display(current)
        if resolved in seen:
            cycle = " -> ".join([*(_display(p) for p in seen), shown])
            raise RecipeError(f"{_display(path)}: base recipes form a cycle: {cycle}")
        seen.append(resolved)
        if not current.is_file():
            raise RecipeError(
                f"{_display(seen[-2]) if len(seen) > 1 else shown}: {BASE_KEY}: no such "
                f"recipe file {shown}"
            )
        data = parse_yaml(read_recipe_text(current, shown), shown)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(
                f"{shown}: a recipe is a mapping of keys ({', '.join(_file_keys(Recipe))}), "
                f"got {_show(data)}"
            )
        base = data.pop(BASE_KEY, None)
        chain.append((shown, data))
        if base is None:
            current = None
        elif not isinstance(base, str) or not base:
            raise RecipeError(
                f"{shown}: {BASE_KEY}: expected a file name relative to the recipe's folder "
                f"(e.g. tiny.yaml), got {_show(base)}"
            )
        else:
            current = resolved.parent / base
    return chain[::-1]


class _Origins:
    """Which file (or --set) gave each key path its value, for messages."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_path: dict[tuple[str, ...], str] = {}

    def record(self, path: tuple[str, ...], value: Any, origin: str) -> None:
        self.by_path[path] = origin
        if isinstance(value, dict):
            for key, sub in value.items():
                self.record((*path, str(key)), sub, origin)

    def of(self, path: str) -> str:
        parts = tuple(path.split(".")) if path else ()
        while parts:
            if parts in self.by_path:
                return self.by_path[parts]
            parts = parts[:-1]
        return self.default


def _merge(into: dict, data: dict, origin: str, origins: _Origins, prefix=()) -> None:
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, origins, path)
        else:
            into[key] = value
            origins.record(path, value, origin)


def parse_override(text: str) -> tuple[str, Any]:
    """``'model.hidden_size=2048'`` -> ``('model.hidden_size', 2048)`` (value read as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise RecipeError(
            f"--set {text}: expected KEY=VALUE with a dotted key, e.g. "
            "--set model.hidden_size=2048 or --set parallel.sequence_parallel=true"
        )
    return key, parse_yaml(raw, f"--set {text}")


def _check_override_key(key: str, text: str) -> None:
    """An override must name an existing key; sections are reached through their keys."""
    cls: Any = Recipe
    parts = key.split(".")
    for depth, part in enumerate(parts):
        accepted = [k for k in _file_keys(cls) if k != BASE_KEY]
        where = ".".join(parts[:depth]) or "the recipe"
        if part == BASE_KEY and cls is Recipe:
            raise RecipeError(f"--set {text}: {BASE_KEY} cannot be overridden")
        if part not in accepted:
            raise RecipeError(
                f"--set {text}: {'.'.join(parts[: depth + 1])}: unknown key; accepted keys "
                f"of {where}: {', '.join(accepted)}"
            )
        tp = _strip_optional(_hints(cls)[part])
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise RecipeError(
                    f"--set {text}: {'.'.join(parts[: depth + 1])} is a value, not a section"
                )
            cls = tp


def _apply_override(merged: dict, key: str, value: Any, origin: str, origins: _Origins) -> None:
    node = merged
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    origins.record(tuple(parts), value, origin)


def _fail(origins: _Origins, path: str, problem: str, accepted: str | None = None) -> RecipeError:
    message = f"{origins.of(path)}: {path}: {problem}"
    if accepted:
        message += f"; accepted: {accepted}"
    return RecipeError(message)


def _coerce(value: Any, tp: Any, path: str, origins: _Origins) -> Any:
    """``value`` checked (strictly) against ``tp``; sections become their dataclasses."""
    if _is_optional(tp):
        if value is None:
            return None
        inner = _strip_optional(tp)
        try:
            return _coerce(value, inner, path, origins)
        except RecipeError as err:
            if "; accepted: " in str(err) and not dataclasses.is_dataclass(inner):
                head, _, _ = str(err).rpartition("; accepted: ")
                raise RecipeError(f"{head}; accepted: {describe_type(tp)}") from None
            raise
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(origins, path, f"expected a section, got {_show(value)}",
                        describe_type(tp))
        return _build(tp, value, path, origins)
    if value is None:
        raise _fail(origins, path, "null is not allowed here", describe_type(tp))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. a step number or a phase name
        own_kind = None  # the complaint of the member of the value's own kind says most
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, path, origins)
            except RecipeError as err:
                literal = typing.get_origin(member) is Literal
                kinds = {type(a) for a in typing.get_args(member)} if literal else {member}
                own_kind = err if type(value) in kinds else own_kind
        if own_kind is not None:
            head, _, _ = str(own_kind).partition("; accepted: ")
            raise RecipeError(f"{head}; accepted: {describe_type(tp)}")
        raise _fail(origins, path, f"got {_show(value)}", describe_type(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise _fail(origins, path, f"got {_show(value)}", describe_type(tp))
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _fail(origins, path, f"expected a list, got {_show(value)}", describe_type(tp))
        return tuple(_coerce(v, item_tp, f"{path}[{i}]", origins) for i, v in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:  # pragma: no cover - a config field of a type this loader does not know
        raise _fail(origins, path, f"unsupported field type {tp!r}")
    if not ok:
        raise _fail(origins, path, f"expected {describe_type(tp)}, got {_show(value)}",
                    describe_type(tp))
    if tp is float:
        value = float(value)
    problem = value_problem(path, value)
    if problem:
        raise _fail(origins, path, problem)
    return value


def _build(cls: type, data: dict, prefix: str, origins: _Origins, **extra: Any) -> Any:
    accepted = _file_keys(cls)
    if cls is not Recipe:
        accepted = [k for k in accepted if k != BASE_KEY]
    for key in data:
        if key not in accepted:
            path = f"{prefix}.{key}" if prefix else str(key)
            where = f"section {prefix}" if prefix else "a recipe"
            raise _fail(origins, path, "unknown key", f"the keys of {where}: {', '.join(accepted)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = dict(extra)
    for f in _key_fields(cls):
        if f.name in data:
            path = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], path, origins)
        elif (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in kwargs
        ):
            path = f"{prefix}.{f.name}" if prefix else f.name
            raise _fail(origins, path, "required key is missing", describe_type(hints[f.name]))
    return cls(**kwargs)


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge (``base:``), override (``--set``) and validate a recipe.

    ``name_or_path`` is a YAML file or the name of a recipe in ``recipes/``; ``overrides``
    are ``KEY=VALUE`` strings. Raises :class:`RecipeError` for anything wrong.
    """
    path = recipe_path(name_or_path)
    shown = _display(path)
    origins = _Origins(shown)
    merged: dict[str, Any] = {}
    for origin, data in _read_chain(path):
        _merge(merged, data, origin, origins)
    for text in overrides:
        key, value = parse_override(text)
        _check_override_key(key, text)
        _apply_override(merged, key, value, f"--set {text}", origins)
    name = path.stem
    if isinstance(merged.get("description"), str):
        merged["description"] = merged["description"].strip()  # YAML '>' adds a newline
    if "pattern" not in merged:
        raise _fail(origins, "pattern", "required key is missing",
                    f"a pattern family ({', '.join(known_families())}) or a literal pattern")
    return _build(Recipe, merged, "", origins, name=name, source=shown,
                  overrides=tuple(overrides))


# --------------------------------------------------------------------------- cross-field rules


def recipe_problems(recipe: Recipe) -> list[str]:
    """Every cross-field rule ``recipe`` breaks (empty if none); each names its fields.

    Size rules come from :func:`megacpp_mcore.settings.sizes.size_problems` (shared with the model
    builder) and are checked only for the block families the layout uses, plus the family
    R is lowered to (``r_lowering``). Two attention rules are checked for every model,
    because Megatron's argument validation asserts them even without attention layers:
    ``hidden_size`` divisible by ``num_attention_heads`` (unless ``kv_channels`` is set) and
    heads divisible by the tensor-parallel size. The data-parallel size is not known until
    launch (it is the world size over TP x PP x CP), so ``global_batch_size`` is only
    checked against ``micro_batch_size`` here; Megatron checks it against
    ``micro_batch_size * data-parallel size`` when it starts.
    """
    try:
        layout = recipe.layout
    except PatternError as err:
        return [f"pattern {recipe.pattern!r} (depth {recipe.depth}): {err}"]
    model, parallel, training = recipe.model, recipe.parallel, recipe.training
    precision, data = recipe.precision, recipe.data
    problems: list[str] = []

    # layout: MTP, R lowering, pipeline stages
    if recipe.mtp_depths != layout.mtp_depth:
        problems.append(
            f"mtp_depths ({recipe.mtp_depths}) does not match the pattern's "
            f"{layout.mtp_depth} multi-token-prediction part(s) ('/' parts of pattern "
            f"{layout.canonical!r}): the MTP layers come from the pattern, one identical '/' "
            "part per depth ('AEM/MA/MA' has 2 MTP depths)"
        )
    if recipe.r_lowering is not None and not layout.has("R"):
        problems.append(
            f"r_lowering ({recipe.r_lowering}) is set but the layout {layout.canonical!r} has "
            "no R layer; remove r_lowering"
        )
    if len(layout.stages) > 1:
        if len(layout.stages) != parallel.pipeline:
            problems.append(
                f"the pattern has {len(layout.stages)} pipeline stages ('|') but "
                f"parallel.pipeline is {parallel.pipeline}: they must be equal"
            )
    elif layout.depth % parallel.pipeline:
        problems.append(
            f"depth ({layout.depth}) must be divisible by parallel.pipeline "
            f"({parallel.pipeline}) when the pattern has no '|' stage marks"
        )

    # sizes (shared with the model builder), for the families in use
    size = size_problems(layout, model, parallel)
    if recipe.r_lowering is not None and layout.has("R"):
        size += [p for p in size_problems(recipe.lowered_layout, model, parallel)
                 if p not in size]
    problems += size
    if not recipe.lowered_layout.has("A"):
        # Megatron validates these for every model (validate_args / TransformerConfig).
        heads = model.num_attention_heads
        if model.kv_channels is None and model.hidden_size % heads:
            problems.append(
                f"model.hidden_size ({model.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({heads}) (or set model.kv_channels): Megatron "
                "checks it even without attention layers"
            )
        if heads % parallel.tensor:
            problems.append(
                f"model.num_attention_heads ({heads}) must be divisible by parallel.tensor "
                f"({parallel.tensor}): Megatron checks it even without attention layers"
            )
    problems += attention_problems(layout, model.attention)  # also: lists without any A
    if layout.has("A"):
        latent = used_variants(recipe.lowered_layout, model.attention, layout) & set(LATENT)
        if latent and model.num_query_groups is not None:
            problems.append(
                f"model.num_query_groups ({model.num_query_groups}) with {sorted(latent)} "
                "attention: multi-latent attention has no query groups (Megatron refuses "
                "--group-query-attention with it); set it null")
        if latent and model.position_embedding != "rope":
            problems.append(
                f"model.position_embedding {model.position_embedding} with {sorted(latent)} "
                "attention: MLA always applies RoPE to its qk_pos_emb_head_dim channels; "
                "use rope")
    moe = model.moe
    if recipe.lowered_layout.has("E") and moe.top_k == 1 and moe.router_score_function == (
            "softmax"):
        problems.append(
            "model.moe.top_k 1 with model.moe.router_score_function softmax: a softmax over "
            "the one chosen expert is constant (zero router gradient), and Megatron refuses it "
            "without a pre-top-k softmax, which recipes do not set; use top_k >= 2 or sigmoid"
        )
    if (recipe.lowered_layout.has("E") and moe.token_dispatcher == "flex"
            and parallel.tensor * parallel.expert == 1):
        problems.append(
            "model.moe.token_dispatcher flex with parallel.tensor x parallel.expert = 1: "
            "Megatron's DeepEP dispatcher asserts TP x EP > 1; use alltoall (or allgather) "
            "at expert-parallel size 1")
    if parallel.expert > 1 and not recipe.lowered_layout.has("E"):
        problems.append(
            f"parallel.expert ({parallel.expert}) > 1 but the layout has no E (MoE) layer"
        )

    # parallel
    if parallel.distributed_optimizer and parallel.fsdp != "none":
        problems.append(
            f"parallel.distributed_optimizer and parallel.fsdp ({parallel.fsdp}) are exclusive: "
            "FSDP shards the optimizer state itself"
        )
    if parallel.fsdp == "torch_fsdp2":
        fsdp2 = {
            "parallel.pipeline": (parallel.pipeline, parallel.pipeline == 1, "1"),
            "parallel.expert": (parallel.expert, parallel.expert == 1, "1"),
            "model.tie_embeddings": (model.tie_embeddings, not model.tie_embeddings, "false"),
            "precision.params_dtype": (precision.params_dtype,
                                       precision.params_dtype != "fp16", "bf16 or fp32"),
        }
        for key, (value, ok, need) in fsdp2.items():
            if not ok:
                problems.append(f"parallel.fsdp torch_fsdp2 needs {key} {need}, got {value} "
                                "(Megatron's rule)")

    # precision
    if precision.params_dtype == "fp32" and not precision.grad_reduce_in_fp32:
        problems.append(
            "precision.grad_reduce_in_fp32 is false but precision.params_dtype is fp32: fp32 "
            "gradients are always reduced in fp32"
        )

    # training
    if training.global_batch_size % training.micro_batch_size:
        problems.append(
            f"training.global_batch_size ({training.global_batch_size}) must be divisible by "
            f"training.micro_batch_size ({training.micro_batch_size}) (and, at launch, by "
            "micro_batch_size x the data-parallel size)"
        )
    if training.min_lr > training.lr:
        problems.append(
            f"training.min_lr ({training.min_lr}) must not exceed training.lr ({training.lr})"
        )
    if training.lr_warmup_iters >= training.train_iters:
        problems.append(
            f"training.lr_warmup_iters ({training.lr_warmup_iters}) must be smaller than "
            f"training.train_iters ({training.train_iters})"
        )
    if training.eval_interval is not None and training.eval_iters == 0:
        problems.append(
            f"training.eval_interval ({training.eval_interval}) is set but "
            "training.eval_iters is 0; set eval_iters >= 1 or eval_interval null"
        )

    # stp
    bad_layers = [n for n in recipe.stp.layers if n > layout.depth]
    if bad_layers:
        problems.append(
            f"stp.layers {bad_layers}: decoder layers are numbered 1..{layout.depth} "
            "(multi-token-prediction layers cannot be chosen)"
        )
    # plasticity
    fire = recipe.plasticity.fire
    phases = fire_phase_steps(training.lr_warmup_iters, recipe.stp)
    missing = {"warmup_end": "training.lr_warmup_iters is 0 (no warm-up to end)",
               "stp_start": "stp.enabled is false"}
    for name in sorted({s for s in fire.steps if isinstance(s, str)} & set(missing)):
        if phases[name] is None:
            problems.append(f"plasticity.fire.steps names {name!r} but {missing[name]}")
    steps = [phases.get(s) if isinstance(s, str) else s for s in fire.steps
             if s != SEQ_LENGTH_CHANGE]
    late = [s for s in steps if s is not None and s > training.train_iters]
    if late:
        problems.append(f"plasticity.fire.steps {late} lie beyond training.train_iters "
                        f"({training.train_iters})")
    if len(set(steps)) != len(steps):
        problems.append(f"plasticity.fire.steps {list(fire.steps)} repeats a step (named "
                        f"phases here: {', '.join(f'{k}={v}' for k, v in phases.items() if v)})")

    # data
    if data.source == "path" and not data.paths:
        problems.append("data.source is path but data.paths is empty")
    if data.source != "path" and data.paths:
        problems.append(f"data.paths is set but data.source is {data.source} (paths are read "
                        "only with source path)")
    if data.source == "embedded" and data.tokenizer != "byte":
        problems.append("data.source embedded needs data.tokenizer byte (the embedded text is "
                        "byte-tokenized)")
    if data.tokenizer == "byte" and model.vocab_size < BYTE_VOCAB_SIZE:
        problems.append(
            f"model.vocab_size ({model.vocab_size}) is smaller than the byte tokenizer's "
            f"{BYTE_VOCAB_SIZE} ids (256 bytes + end-of-document)"
        )
    split = data.split.split(",")
    if len(split) != 3 or not all(re.fullmatch(r"\d+(\.\d*)?", s.strip()) for s in split) or (
        sum(float(s) for s in split) <= 0
    ):
        problems.append(
            f"data.split ({data.split!r}) must be three non-negative weights "
            "'train,valid,test' with a positive sum, e.g. '98,2,0'"
        )
    return problems


# --------------------------------------------------------------------------- describe


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6)


def _describe_section(cls: type, prefix: str, lines: list[str]) -> None:
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in _key_fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"{path}: {docs.get(f.name, '')}  [{tp.__name__}]")
            _describe_section(tp, f"{path}.", lines)
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(_plain(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(_plain(f.default_factory()))
        else:
            default = "required"
        lines.append(f"  {path}  ({describe_type(tp)}; default {default})")
        lines.append(_wrap(docs.get(f.name, "(undocumented)")))


def describe() -> str:
    """Every recipe key with its type, default and documentation (from the docstrings)."""
    lines = [
        "A recipe is a YAML mapping of these keys (recipes/*.yaml). 'base: FILE' deep-merges",
        "it over another recipe (relative to its folder); --set KEY=VALUE overrides a key.",
        "",
    ]
    docs = field_docs(Recipe)
    hints = _hints(Recipe)
    for f in _key_fields(Recipe):
        if f.name == "name":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"{f.name}: {docs.get(f.name, '')}  [{tp.__name__}]")
            lines.append(f"  {(tp.__doc__ or '').strip().splitlines()[0]}")
            _describe_section(tp, f"{f.name}.", lines)
        else:
            default = "required" if f.default is dataclasses.MISSING else json.dumps(f.default)
            lines.append(f"  {f.name}  ({describe_type(tp)}; default {default})")
            lines.append(_wrap(docs.get(f.name, "(undocumented)")))
    return "\n".join(lines)


__all__ = [
    "BACKENDS",
    "FAMILIES",
    "R_LOWERINGS",
    "Recipe",
    "describe",
    "field_docs",
    "known_recipes",
    "load_recipe",
    "recipe_problems",
]

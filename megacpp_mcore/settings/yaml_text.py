"""The strict YAML of recipes: reading one file, and a recipe's ``base:`` chain.

Safe YAML with YAML 1.2 numbers (``3e-4`` is a number), no duplicate keys, no aliases, at
most :data:`MAX_YAML_DEPTH` levels of nesting, files of at most :data:`MAX_RECIPE_BYTES` of
strict UTF-8. Every refusal is a :class:`RecipeError` naming the file (or ``--set``).
Finding recipes by name (``recipes/NAME.yaml``) lives here too. Pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.paths import RECIPES_DIR, REPO_ROOT
from megacpp_mcore.settings.schema import show

#: the key that names a base recipe; consumed while loading, never a Recipe field.
BASE_KEY = "base"

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


def display(path: Path) -> str:
    """A file as messages name it: relative to the repository where it is inside it."""
    path = path.resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def read_chain(path: Path, keys: Sequence[str]) -> list[tuple[str, dict]]:
    """The recipe and its bases, root base first: ``[(display name, mapping), ...]``
    (``keys``: the keys a recipe file may hold, for the message when it is no mapping)."""
    chain: list[tuple[str, dict]] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        resolved = current.resolve()
        shown = display(current)
        if resolved in seen:
            cycle = " -> ".join([*(display(p) for p in seen), shown])
            raise RecipeError(f"{display(path)}: base recipes form a cycle: {cycle}")
        seen.append(resolved)
        if not current.is_file():
            raise RecipeError(
                f"{display(seen[-2]) if len(seen) > 1 else shown}: {BASE_KEY}: no such "
                f"recipe file {shown}"
            )
        data = parse_yaml(read_recipe_text(current, shown), shown)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(
                f"{shown}: a recipe is a mapping of keys ({', '.join(keys)}), "
                f"got {show(data)}"
            )
        base = data.pop(BASE_KEY, None)
        chain.append((shown, data))
        if base is None:
            current = None
        elif not isinstance(base, str) or not base:
            raise RecipeError(
                f"{shown}: {BASE_KEY}: expected a file name relative to the recipe's folder "
                f"(e.g. tiny.yaml), got {show(base)}"
            )
        else:
            current = resolved.parent / base
    return chain[::-1]


__all__ = [
    "BASE_KEY",
    "MAX_RECIPE_BYTES",
    "MAX_YAML_DEPTH",
    "display",
    "known_recipes",
    "parse_yaml",
    "read_chain",
    "read_recipe_text",
    "recipe_path",
]

"""Command-line overrides of a recipe: ``--set KEY=VALUE`` (the value read as YAML).

An override names an existing key by its dotted path (sections are reached through their
keys, ``base`` cannot be overridden); it is applied after the file and its bases are merged,
and its origin is recorded for messages. The value is then checked like any other, by the
type engine, when the recipe is built. Pure Python.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.settings.origins import Origins
from megacpp_mcore.settings.schema import hints, strip_optional
from megacpp_mcore.settings.yaml_text import BASE_KEY, parse_yaml


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


def check_override_key(root: type, key: str, text: str,
                       keys: Callable[[type], list[str]]) -> None:
    """An override must name an existing key; sections are reached through their keys
    (``keys(cls)``: the keys a recipe file may hold at the level of ``cls``, ``root`` the
    recipe's own class)."""
    cls: Any = root
    parts = key.split(".")
    for depth, part in enumerate(parts):
        accepted = [k for k in keys(cls) if k != BASE_KEY]
        where = ".".join(parts[:depth]) or "the recipe"
        if part == BASE_KEY and cls is root:
            raise RecipeError(f"--set {text}: {BASE_KEY} cannot be overridden")
        if part not in accepted:
            raise RecipeError(
                f"--set {text}: {'.'.join(parts[: depth + 1])}: unknown key; accepted keys "
                f"of {where}: {', '.join(accepted)}"
            )
        tp = strip_optional(hints(cls)[part])
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise RecipeError(
                    f"--set {text}: {'.'.join(parts[: depth + 1])} is a value, not a section"
                )
            cls = tp


def apply_override(merged: dict, key: str, value: Any, origin: str, origins: Origins) -> None:
    """Set ``key`` (dotted) to ``value`` in the merged recipe mapping, from ``origin``."""
    node = merged
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    origins.record(tuple(parts), value, origin)


__all__ = ["apply_override", "check_override_key", "parse_override"]

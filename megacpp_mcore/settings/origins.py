"""Which file (or ``--set``) gave each key of a recipe its value, for messages.

The loader records, while it deep-merges a recipe over its bases and applies the ``--set``
overrides, the origin of every key path; a refused value's message then starts with the
file or the override that wrote it. Pure Python.
"""

from __future__ import annotations

from typing import Any

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.settings.schema import FieldError


class Origins:
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


def merge(into: dict, data: dict, origin: str, origins: Origins, prefix=()) -> None:
    """Deep-merge ``data`` (from ``origin``) into ``into``, recording each key's origin."""
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value, origin, origins, path)
        else:
            into[key] = value
            origins.record(path, value, origin)


def fail(origins: Origins, path: str, problem: str, accepted: str | None = None) -> RecipeError:
    """A refusal of the value at ``path``, prefixed with the file or ``--set`` that gave it."""
    message = f"{origins.of(path)}: {path}: {problem}"
    if accepted:
        message += f"; accepted: {accepted}"
    return RecipeError(message)


def located(origins: Origins, err: FieldError) -> RecipeError:
    """The type engine's refusal ``err``, prefixed with its value's origin."""
    return fail(origins, err.path, err.problem, err.accepted)


__all__ = ["Origins", "fail", "located", "merge"]

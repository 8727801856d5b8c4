"""``megacpp recipe describe``: every recipe key with its type, default and doc.

The docs are the fields' attribute docstrings (``schema.field_docs``) and the types are
described by the type engine (``schema.describe_type``), so what ``describe`` prints is what
the loader checks. Pure Python.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap

from megacpp_mcore.settings.recipe import Recipe
from megacpp_mcore.settings.schema import describe_type, field_docs, hints, key_fields, plain


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6)


def _describe_section(cls: type, prefix: str, lines: list[str]) -> None:
    docs = field_docs(cls)
    tps = hints(cls)
    for f in key_fields(cls):
        path = f"{prefix}{f.name}"
        tp = tps[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"{path}: {docs.get(f.name, '')}  [{tp.__name__}]")
            _describe_section(tp, f"{path}.", lines)
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(plain(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(plain(f.default_factory()))
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
    tps = hints(Recipe)
    for f in key_fields(Recipe):
        if f.name == "name":
            continue
        tp = tps[f.name]
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


__all__ = ["describe"]

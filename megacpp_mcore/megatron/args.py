"""The plugin's own Megatron-LM flags, and the settings they carry back out of Megatron's args.

:func:`add_megacpp_args` is an ``extra_args_provider`` for Megatron's
``parse_and_validate_args``: it adds one argument group, ``megacpp``, with every flag this
plugin reads (``megacpp translate --target plugin`` emits them). Every ``--megacpp-*`` flag
is a row of the settings table (:mod:`megacpp_mcore.settings.table`: the settings' rows and
the recipe-level and provenance :data:`~megacpp_mcore.settings.table.RECIPE_ROWS`) and is
registered from it, with its type, default, help text (the field's attribute docstring) and
check from the settings dataclasses (:mod:`megacpp_mcore.settings.schema`), and the few
argparse details a field's type does not say from the row or the field's metadata; a new
plugin setting is a table row, not code here.

The readers turn Megatron's parsed ``args`` back into this project's settings, row by row
of the same table: :func:`section_from_args`, :func:`recurrent_config_from_args`,
:func:`mamba_config_from_args` and :func:`model_config_from_args` (the whole model section,
used by the plugin's
``--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec``). They refuse, with a
:class:`SpecError`, values this project cannot build rather than approximating them.
Importing this module does not import Megatron or torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from megacpp_mcore.errors import RecipeError, SpecError
from megacpp_mcore.plan import parse_plan
from megacpp_mcore.settings.config import (
    MambaConfig,
    ModelConfig,
    PlasticityConfig,
    RecurrentConfig,
    StpConfig,
)
from megacpp_mcore.settings.recipe import Recipe
from megacpp_mcore.settings.schema import (
    FieldError,
    coerce,
    field_docs,
    scalar_type,
    strip_optional,
)
from megacpp_mcore.settings.table import BY_KEY, plugin_rows
from megacpp_mcore.settings.table import rows as table_rows

GROUP = "megacpp"


def _field(key: str) -> tuple[type, dataclasses.Field | None, Any]:
    """The settings dataclass, field (None for a property, e.g. ``recipe_hash``) and type
    hint of a recipe key path."""
    cls: Any = Recipe
    parts = key.split(".")
    for part in parts[:-1]:
        cls = typing.get_type_hints(cls, include_extras=True)[part]
    f = next((f for f in dataclasses.fields(cls) if f.name == parts[-1]), None)
    return cls, f, typing.get_type_hints(cls, include_extras=True).get(parts[-1], str)


def _plan(text: str) -> str:
    """A per-layer plan as ``ModelPlan.flag`` writes it (validated; returned as given)."""
    try:
        parse_plan(text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


#: argparse types the settings package cannot name: the per-layer plan's parser sits above
#: it (megacpp_mcore.plan reads the settings), by row key.
ROW_TYPES: dict[str, Callable[[str], Any]] = {"pattern": _plan}


def _parser_for(key: str, tp: Any, null_token: str | None = None) -> Callable[[str], Any]:
    """argparse type for a row's value (or list item) of field type ``tp``: the text read
    as the field's scalar type, then checked by the type engine (its range); an
    ``int | Literal[...]`` item (FIRE's steps or phase names) takes either; ``null_token``
    (field metadata) stands for null."""
    names = [a for t in typing.get_args(tp) if typing.get_origin(t) is typing.Literal
             for a in typing.get_args(t)]
    plain = scalar_type(tp)
    kind = int if names or plain is int else float if plain is float else str

    def parse(text: str) -> Any:
        if text in names or (null_token is not None and text == null_token):
            return text
        try:
            value = kind(text)
        except ValueError:
            expected = f"an integer or one of {', '.join(names)}" if names else (
                f"{kind.__name__} or {null_token!r}" if null_token else kind.__name__)
            raise argparse.ArgumentTypeError(
                f"{key}: expected {expected}, got {text!r}") from None
        try:
            return coerce(value, tp, key)
        except FieldError as err:
            raise argparse.ArgumentTypeError(f"{key}: {err.problem}") from None

    return parse


#: row kinds whose flag the translator writes from the recipe as a whole (no field default)
_RECIPE_KINDS = ("recipe", "provenance")


def _help(row: Any, cls: type, f: dataclasses.Field | None, default: Any) -> str:
    if row.kind in _RECIPE_KINDS:
        return f"{row.reason}."
    family = f" ({row.families} layers)" if row.families else ""
    return f"{row.key}{family}: {field_docs(cls).get(f.name, '')} (default {default})"


def register_row(group: Any, row: Any) -> None:
    """Add one table row's ``--megacpp-*`` flag: a switch for a boolean, ``true|false`` for
    a truth row, choices for a literal, else a typed value checked by the field's type;
    default and help from the settings dataclass, argparse details (``metavar``,
    ``default``) from the row and the field's metadata."""
    cls, f, tp = _field(row.key)
    field_default = None if f is None or f.default is dataclasses.MISSING or (
        row.kind in _RECIPE_KINDS) else f.default
    default = row.argparse.get("default", field_default)
    help_text = _help(row, cls, f, ("true" if field_default else "false") if (
        row.kind == "truth") else field_default)
    metadata = f.metadata if f is not None else {}
    plain = strip_optional(tp)
    if row.kind == "switch":
        group.add_argument(row.flag, action="store_true", help=help_text)
        return
    kwargs: dict[str, Any] = {"default": default, "help": help_text}
    if row.kind == "truth":
        kwargs.update(choices=("true", "false"),
                      default="true" if field_default else "false")
    elif row.key in ROW_TYPES:
        kwargs.update(type=ROW_TYPES[row.key])
    elif typing.get_origin(scalar_type(plain)) is typing.Literal:
        kwargs.update(choices=typing.get_args(scalar_type(plain)))
    elif typing.get_origin(scalar_type(plain)) is tuple:  # a list: one value per item
        item = typing.get_args(scalar_type(plain))[0]
        kwargs.update(type=_parser_for(row.key, item), nargs="*", default=list(default),
                      metavar="VALUE")
    else:
        null_token = metadata.get("null_token")
        kwargs.update(type=_parser_for(row.key, tp, null_token),
                      metavar=f"N|{null_token}" if null_token else "VALUE")
    kwargs.update({k: v for k, v in row.argparse.items() if k != "default"})
    group.add_argument(row.flag, **kwargs)


#: the plasticity sections; every field is one table row whose flag is
#: --megacpp-plasticity-SECTION-FIELD (underscores as dashes).
PLASTICITY_SECTIONS = ("fire", "dash", "redo")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_megacpp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``megacpp`` argument group to Megatron's parser (an extra_args_provider):
    one flag per ``--megacpp-*`` row of the settings table."""
    group = parser.add_argument_group(
        title=GROUP,
        description="megacpp-mcore plugin settings (emitted by `megacpp translate --target "
        "plugin`).",
    )
    for row in plugin_rows():
        register_row(group, row)
    return parser


def stp_config_from_args(args: Any) -> StpConfig:
    """The STP section from Megatron's parsed args (``--megacpp-stp``, ``--megacpp-stp-*``)."""
    return section_from_args("stp", args)


def plasticity_config_from_args(args: Any) -> PlasticityConfig:
    """The plasticity section from Megatron's parsed args (``--megacpp-plasticity-*``)."""
    return section_from_args("plasticity", args, **{
        name: section_from_args(f"plasticity.{name}", args) for name in PLASTICITY_SECTIONS})


def _megacpp(args: Any, flag: str) -> Any:
    dest = _dest(flag)
    if not hasattr(args, dest):
        raise SpecError(
            f"Megatron's args have no {flag}: register the plugin's flags with "
            "parse_and_validate_args(extra_args_provider=megacpp_mcore.megatron.args."
            "add_megacpp_args)"
        )
    return getattr(args, dest)


def section_from_args(prefix: str, args: Any, **nested: Any) -> Any:
    """The settings section ``prefix`` (``"model.moe"``) read back from Megatron's args.

    Every row of the section is read with its :meth:`Setting.read`; a null where the field
    takes no null (a family the flags did not mention) reads as the dataclass default.
    Values this project cannot build raise :class:`SpecError` naming the flag.
    """
    cls = _field(prefix)[2]
    kwargs: dict[str, Any] = dict(nested)
    for row in table_rows(prefix + "."):
        if row.section != prefix:
            continue
        if row.plugin_only:
            _megacpp(args, row.flag)  # the plugin's flags must have been registered
        value = row.read(args)
        _, f, tp = _field(row.key)
        if value is None and strip_optional(tp) is tp:
            value = f.default
        kwargs[row.name] = value
    try:
        return cls(**kwargs)
    except RecipeError as err:
        key = err.key if isinstance(err, FieldError) else str(err).partition(":")[0]
        row = BY_KEY.get(key)
        flag = (row.flag or ", ".join(f for f in row.choices.values() if f)) if row else None
        raise SpecError(f"Megatron's args ({flag or key}) give a setting this project cannot "
                        f"build: {err}") from None


def recurrent_config_from_args(args: Any) -> RecurrentConfig:
    """The R settings from Megatron's parsed args (``--megacpp-r-*``)."""
    return section_from_args("model.recurrent", args)


def mamba_config_from_args(args: Any) -> MambaConfig:
    """The Mamba-2 settings: Megatron's ``--mamba-*`` plus the plugin's ``--megacpp-mamba-*``."""
    return section_from_args("model.mamba", args)


def model_config_from_args(args: Any) -> ModelConfig:
    """The model section from Megatron's parsed (and validated) args.

    ``kv_channels`` comes back as null when it equals ``hidden_size / num_attention_heads``
    (Megatron fills that default in during validation); ``num_query_groups`` is null unless
    ``--group-query-attention`` is set. Settings of families a pattern does not use keep
    whatever Megatron's defaults are. The attention variant of each A position is not a
    setting here: it travels in the per-layer plan (``--megacpp-plan``, read by
    ``spec_seam.plan_from_args``), so ``attention``'s position settings keep their defaults
    and only the MLA/DSA sizes are read.
    """
    if getattr(args, "quick_geglu", False):
        raise SpecError("--quick-geglu: this project builds swiglu, squared_relu or gelu MLPs")
    if args.vocab_size is None and args.padded_vocab_size is None:
        raise SpecError("Megatron's args have neither --vocab-size nor a padded vocabulary")
    return section_from_args(
        "model", args,
        attention=section_from_args("model.attention", args,
                                    mla=section_from_args("model.attention.mla", args),
                                    dsa=section_from_args("model.attention.dsa", args)),
        moe=section_from_args("model.moe", args),
        mamba=mamba_config_from_args(args),
        recurrent=recurrent_config_from_args(args),
        gdn=section_from_args("model.gdn", args),
        ngram_hash=section_from_args("model.ngram_hash", args),
    )


__all__ = [
    "PLASTICITY_SECTIONS",
    "add_megacpp_args",
    "mamba_config_from_args",
    "model_config_from_args",
    "plasticity_config_from_args",
    "recurrent_config_from_args",
    "register_row",
    "section_from_args",
    "stp_config_from_args",
]

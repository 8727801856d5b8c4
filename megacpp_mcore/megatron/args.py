"""The plugin's own Megatron-LM flags, and the settings they carry back out of Megatron's args.

:func:`add_megacpp_args` is an ``extra_args_provider`` for Megatron's
``parse_and_validate_args``: it adds one argument group, ``megacpp``, with every flag this
plugin reads (``megacpp translate --target plugin`` emits them). Every ``--megacpp-*`` row
of the settings table (:mod:`megacpp_mcore.settings.table`) is registered from the table, with
its default and help text from the settings dataclasses (each field is documented once,
there) and its check; a new plugin setting is a table row, not code here.

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
from typing import Any

from megacpp_mcore.errors import RecipeError, SpecError
from megacpp_mcore.plan import parse_plan
from megacpp_mcore.settings.config import (
    DataConfig,
    MambaConfig,
    ModelConfig,
    PlasticityConfig,
    RecurrentConfig,
    StpConfig,
)
from megacpp_mcore.settings.recipe import BACKENDS, Recipe, field_docs
from megacpp_mcore.settings.table import AUTO_HEADS, BY_KEY, plugin_rows, value_problem
from megacpp_mcore.settings.table import rows as table_rows

GROUP = "megacpp"


def _field(key: str) -> tuple[type, dataclasses.Field, Any]:
    """The settings dataclass, field and type hint of a recipe key path."""
    cls: Any = Recipe
    parts = key.split(".")
    for part in parts[:-1]:
        cls = typing.get_type_hints(cls)[part]
    f = next(f for f in dataclasses.fields(cls) if f.name == parts[-1])
    return cls, f, typing.get_type_hints(cls)[parts[-1]]


def _registered_rows() -> tuple:
    """Plugin rows registered from the table (all but those registered by hand below)."""
    return tuple(row for row in plugin_rows() if row.register)


def register_row(group: Any, row: Any) -> None:
    """Add one table row's ``--megacpp-*`` flag: a switch for a boolean, choices for a
    literal, else a typed value checked by the row's check; default and help from the
    settings dataclass."""
    cls, f, tp = _field(row.key)
    family = f" ({row.families} layers)" if row.families else ""
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = f"{row.key}{family}: {field_docs(cls).get(f.name, '')} (default {default})"
    plain = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if (
        _optional(tp)) else tp
    if row.kind == "switch":
        group.add_argument(row.flag, action="store_true", help=help_text)
    elif typing.get_origin(plain) is typing.Literal:
        group.add_argument(row.flag, choices=typing.get_args(plain), default=default,
                           help=help_text)
    elif typing.get_origin(plain) is tuple:  # a list: one value per item, each checked
        item = typing.get_args(plain)[0]
        group.add_argument(row.flag, type=_parser_for(row.key, item), nargs="*",
                           default=list(default), metavar="VALUE", help=help_text)
    else:
        group.add_argument(row.flag, type=_parser_for(row.key, plain), default=default,
                           metavar="VALUE", help=help_text)


#: the plasticity sections; every field is one table row whose flag is
#: --megacpp-plasticity-SECTION-FIELD (underscores as dashes).
PLASTICITY_SECTIONS = ("fire", "dash", "redo")



def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _parser_for(key: str, tp: Any):
    """argparse type for a table row: the field's scalar type, then the row's check (an
    ``int | Literal[...]`` item, as FIRE's steps or phase names, takes either)."""
    names = [a for t in typing.get_args(tp) if typing.get_origin(t) is typing.Literal
             for a in typing.get_args(t)]
    if names:
        number = _parser_for(key, int)

        def number_or_name(text: str) -> Any:
            if text in names:
                return text
            if not text.lstrip("-").isdigit():
                raise argparse.ArgumentTypeError(
                    f"{key}: expected an integer or one of {', '.join(names)}, got {text!r}")
            return number(text)

        return number_or_name
    kind = int if tp is int else float if tp is float else str

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{key}: expected {kind.__name__}, got {text!r}") from None
        problem = value_problem(key, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{key}: {problem}")
        return value

    return parse


def _r_heads(text: str) -> int | str:
    """R heads: a positive integer, or 'auto' (hidden_size // (k_head_dim + v_head_dim))."""
    if text == AUTO_HEADS:
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"model.recurrent.num_heads: expected int or {AUTO_HEADS!r}, got {text!r}") from None
    problem = value_problem("model.recurrent.num_heads", value)
    if problem:
        raise argparse.ArgumentTypeError(f"model.recurrent.num_heads: {problem}")
    return value


def _plan(text: str) -> str:
    """A per-layer plan as ``ModelPlan.flag`` writes it (validated; returned as given)."""
    try:
        parse_plan(text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_megacpp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``megacpp`` argument group to Megatron's parser (an extra_args_provider)."""
    group = parser.add_argument_group(
        title=GROUP,
        description="megacpp-mcore plugin settings (emitted by `megacpp translate --target "
        "plugin`).",
    )
    group.add_argument(
        "--megacpp-plan", type=_plan, default=None, metavar="PLAN",
        help="the per-layer plan (megacpp_mcore.plan): one token per layer of "
        "--hybrid-layer-pattern, its letter (A E M F R G) and variant (A:gqa, A:mla, A:dsa, "
        "M:mamba2, M:mamba3, R:m2rnn), '|' between stages and '/' before each MTP part; R "
        "layers travel in Megatron's G slot there, and this flag tells the plugin's stack R "
        "from G.",
    )
    group.add_argument(
        "--megacpp-recipe", default=None, metavar="PATH",
        help="the recipe the flags were translated from (provenance for receipts; the flags "
        "themselves are authoritative).",
    )
    group.add_argument(
        "--megacpp-recipe-hash", default=None, metavar="SHA256",
        help="sha256 of the fully resolved recipe (overrides included), for receipts.",
    )
    group.add_argument(
        "--megacpp-backend", choices=BACKENDS, default=None,
        help="the backend the recipe asked for (auto, te or local); --transformer-impl is "
        "what Megatron builds. Recorded in receipts next to what actually ran.",
    )
    for row in _registered_rows():
        register_row(group, row)
    docs = field_docs(RecurrentConfig)
    group.add_argument(
        "--megacpp-r-num-heads", type=_r_heads, default=RecurrentConfig.num_heads,
        metavar=f"N|{AUTO_HEADS}",
        help=f"model.recurrent.num_heads (R layers): {docs['num_heads']} ('{AUTO_HEADS}' for "
        f"null; default {RecurrentConfig.num_heads})")
    group.add_argument(
        "--megacpp-r-forget-bf16", choices=("true", "false"), default="false",
        help=f"model.recurrent.forget_bf16 (R layers): {docs['forget_bf16']} (default false)")
    group.add_argument(
        "--megacpp-receipt", default=None, metavar="PATH",
        help="where the run receipt (JSON) is written; a path ending in '/' is a folder that "
        "receives one new file per run.",
    )
    group.add_argument(
        "--megacpp-data", choices=_literal_values(DataConfig, "source"), default=None,
        help="the training data source: " + field_docs(DataConfig)["source"]
        + " (mock and path also have Megatron's own --mock-data / --data-path; embedded "
        "exists only here).",
    )
    return parser


def stp_config_from_args(args: Any) -> StpConfig:
    """The STP section from Megatron's parsed args (``--megacpp-stp``, ``--megacpp-stp-*``)."""
    return section_from_args("stp", args)


def plasticity_config_from_args(args: Any) -> PlasticityConfig:
    """The plasticity section from Megatron's parsed args (``--megacpp-plasticity-*``)."""
    return section_from_args("plasticity", args, **{
        name: section_from_args(f"plasticity.{name}", args) for name in PLASTICITY_SECTIONS})


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


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
        if value is None and not _optional(tp):
            value = f.default
        kwargs[row.name] = value
    try:
        return cls(**kwargs)
    except RecipeError as err:
        key = str(err).partition(":")[0]
        row = BY_KEY.get(key)
        flag = (row.flag or ", ".join(f for f in row.choices.values() if f)) if row else None
        raise SpecError(f"Megatron's args ({flag or key}) give a setting this project cannot "
                        f"build: {err}") from None


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def recurrent_config_from_args(args: Any) -> RecurrentConfig:
    """The R settings from Megatron's parsed args (``--megacpp-r-*``)."""
    return section_from_args("model.recurrent", args)


def mamba_config_from_args(args: Any) -> MambaConfig:
    """The Mamba-2 settings: Megatron's ``--mamba-*`` plus the plugin's ``--megacpp-mamba-*``."""
    return section_from_args("model.mamba", args)


def _literal_values(cls: type, name: str) -> tuple[Any, ...]:
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is not typing.Literal:  # Literal[...] | None
        tp = next(a for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal)
    return typing.get_args(tp)


def model_config_from_args(args: Any) -> ModelConfig:
    """The model section from Megatron's parsed (and validated) args.

    ``kv_channels`` comes back as null when it equals ``hidden_size / num_attention_heads``
    (Megatron fills that default in during validation); ``num_query_groups`` is null unless
    ``--group-query-attention`` is set. Settings of families a pattern does not use keep
    whatever Megatron's defaults are.
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

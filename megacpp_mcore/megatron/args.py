"""The plugin's own Megatron-LM flags, and the settings they carry back out of Megatron's args.

:func:`add_megacpp_args` is an ``extra_args_provider`` for Megatron's
``parse_and_validate_args``: it adds one argument group, ``megacpp``, with every flag this
plugin reads (``megacpp translate --target plugin`` emits them). Defaults and help texts come
from the settings dataclasses of :mod:`megacpp_mcore.settings.config` (each field is documented
once, there). Later features add their flags to the same group, the same way.

The readers turn Megatron's parsed ``args`` back into this project's settings:
:func:`recurrent_config_from_args`, :func:`mamba_config_from_args` and
:func:`model_config_from_args` (the whole model section, used by the plugin's
``--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec``). They refuse, with a
:class:`SpecError`, values this project cannot build rather than approximating them.
Importing this module does not import Megatron or torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from megacpp_mcore.errors import PatternError, SpecError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.settings.config import (
    DashConfig,
    DataConfig,
    FireConfig,
    GatedDeltaNetConfig,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    PlasticityConfig,
    RecurrentConfig,
    RedoConfig,
)
from megacpp_mcore.settings.recipe import BACKENDS, field_docs

GROUP = "megacpp"

#: --megacpp-r-* flag -> RecurrentConfig field
R_FLAGS = {
    "--megacpp-r-num-heads": "num_heads",
    "--megacpp-r-k-head-dim": "k_head_dim",
    "--megacpp-r-v-head-dim": "v_head_dim",
    "--megacpp-r-conv-kernel": "conv_kernel",
    "--megacpp-r-backward-chunk": "backward_chunk",
}
#: plasticity section -> its settings class; every field is a flag
#: --megacpp-plasticity-SECTION-FIELD (underscores as dashes).
PLASTICITY_SECTIONS = {"fire": FireConfig, "dash": DashConfig, "redo": RedoConfig}


def plasticity_flag(section: str, name: str) -> str:
    return f"--megacpp-plasticity-{section}-{name.replace('_', '-')}"


def plasticity_flag_value(value: Any) -> str | None:
    """A plasticity setting as its flag's text (lists comma-joined); None when unset."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


#: --megacpp-mamba-* flag -> MambaConfig field (the Mamba settings Megatron has no flag for)
MAMBA_FLAGS = {
    "--megacpp-mamba-conv-kernel": "conv_kernel",
    "--megacpp-mamba-chunk-size": "chunk_size",
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _pattern(text: str) -> str:
    """A full-length pattern in this project's letters (validated; returned as given)."""
    try:
        parse_pattern(text)
    except PatternError as err:
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
        "--megacpp-pattern", type=_pattern, default=None, metavar="PATTERN",
        help="the layout in this project's letters (A E M F R G, '|' stages, '/' MTP parts), "
        "fully expanded, one letter per layer of --hybrid-layer-pattern; R layers travel in "
        "Megatron's G slot there, and this flag tells the plugin's stack R from G.",
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
    docs = field_docs(RecurrentConfig)
    for flag, name in R_FLAGS.items():
        default = _default(RecurrentConfig, name)
        group.add_argument(flag, type=_positive_int, default=default, metavar="N",
                           help=f"recurrent (R) layers: {docs[name]} (default {default})")
    docs = field_docs(MambaConfig)
    for flag, name in MAMBA_FLAGS.items():
        default = _default(MambaConfig, name)
        group.add_argument(flag, type=_positive_int, default=default, metavar="N",
                           help=f"Mamba-2 (M) layers built by the plugin: {docs[name]} "
                           f"(default {default}; Megatron has no flag for it)")
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
    _add_plasticity_args(group)
    return parser


def _step_list(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    return tuple(_positive_int(part) for part in text.split(","))


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _add_plasticity_args(group) -> None:
    """One flag per field of the plasticity sections (defaults and help from the classes)."""
    for section, cls in PLASTICITY_SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = _hint(cls, f.name)
            args: dict[str, Any] = {"default": f.default, "help": f"plasticity {section}: "
                                    f"{docs[f.name]} (default {f.default})"}
            if typing.get_origin(tp) is tuple:
                args.update(type=_step_list, default=(), metavar="STEP,STEP,...")
            elif typing.get_origin(tp) is typing.Literal:
                args.update(choices=typing.get_args(tp))
            elif tp is float:
                args.update(type=_unit_float, metavar="X")
            else:  # int or int | None
                args.update(type=_positive_int if f.name != "rewarmup_iters" else int,
                            metavar="N")
            group.add_argument(plasticity_flag(section, f.name), **args)


def plasticity_config_from_args(args: Any) -> PlasticityConfig:
    """The plasticity section from Megatron's parsed args (``--megacpp-plasticity-*``)."""
    sections = {}
    for section, cls in PLASTICITY_SECTIONS.items():
        values = {f.name: _megacpp(args, plasticity_flag(section, f.name))
                  for f in dataclasses.fields(cls)}
        sections[section] = cls(**values)
    return PlasticityConfig(**sections)


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


def recurrent_config_from_args(args: Any) -> RecurrentConfig:
    """The R settings from Megatron's parsed args (``--megacpp-r-*``)."""
    return RecurrentConfig(**{name: _megacpp(args, flag) for flag, name in R_FLAGS.items()})


def mamba_config_from_args(args: Any) -> MambaConfig:
    """The Mamba-2 settings: Megatron's ``--mamba-*`` plus the plugin's ``--megacpp-mamba-*``."""
    return MambaConfig(
        state_dim=args.mamba_state_dim,
        head_dim=args.mamba_head_dim,
        num_groups=args.mamba_num_groups,
        num_heads=args.mamba_num_heads,
        **{name: _megacpp(args, flag) for flag, name in MAMBA_FLAGS.items()},
    )


def _single(value: Any, flag: str) -> Any:
    if isinstance(value, list):
        if len(value) != 1:
            raise SpecError(f"{flag} {value}: this project builds one value per model")
        return value[0]
    return value


def _literal_values(cls: type, name: str) -> tuple[Any, ...]:
    tp = _hint(cls, name)
    if typing.get_origin(tp) is not typing.Literal:  # Literal[...] | None
        tp = next(a for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal)
    return typing.get_args(tp)


def _choice(value: Any, cls: type, name: str, flag: str) -> Any:
    allowed = _literal_values(cls, name)
    if value not in allowed:
        raise SpecError(
            f"{flag} {value!r} cannot be built by this project; accepted: "
            + ", ".join(map(str, allowed))
        )
    return value


def model_config_from_args(args: Any) -> ModelConfig:
    """The model section from Megatron's parsed (and validated) args.

    ``kv_channels`` comes back as null when it equals ``hidden_size / num_attention_heads``
    (Megatron fills that default in during validation); ``num_query_groups`` is null unless
    ``--group-query-attention`` is set. Settings of families a pattern does not use keep
    whatever Megatron's defaults are.
    """
    if getattr(args, "quick_geglu", False):
        raise SpecError("--quick-geglu: this project builds swiglu, squared_relu or gelu MLPs")
    activation = "swiglu" if args.swiglu else "squared_relu" if args.squared_relu else "gelu"
    heads, hidden = args.num_attention_heads, args.hidden_size
    kv = args.kv_channels
    if kv is not None and hidden % heads == 0 and kv == hidden // heads:
        kv = None
    vocab = args.vocab_size if args.vocab_size is not None else args.padded_vocab_size
    if vocab is None:
        raise SpecError("Megatron's args have neither --vocab-size nor a padded vocabulary")
    moe_default = MoEConfig()
    moe = MoEConfig(
        num_experts=args.num_experts or moe_default.num_experts,
        top_k=args.moe_router_topk,
        ffn_hidden_size=args.moe_ffn_hidden_size or moe_default.ffn_hidden_size,
        shared_expert_ffn_hidden_size=args.moe_shared_expert_intermediate_size,
        router_load_balancing=_choice(
            _single(args.moe_router_load_balancing_type, "--moe-router-load-balancing-type"),
            MoEConfig, "router_load_balancing", "--moe-router-load-balancing-type"),
        aux_loss_coeff=float(_single(args.moe_aux_loss_coeff, "--moe-aux-loss-coeff")),
        router_score_function=_choice(args.moe_router_score_function, MoEConfig,
                                      "router_score_function", "--moe-router-score-function"),
        grouped_gemm=bool(args.moe_grouped_gemm),
        token_dispatcher=_choice(args.moe_token_dispatcher_type, MoEConfig, "token_dispatcher",
                                 "--moe-token-dispatcher-type"),
    )
    gdn = GatedDeltaNetConfig(
        num_key_heads=args.linear_num_key_heads,
        num_value_heads=args.linear_num_value_heads,
        key_head_dim=args.linear_key_head_dim,
        value_head_dim=args.linear_value_head_dim,
        conv_kernel=args.linear_conv_kernel_dim,
    )
    return ModelConfig(
        hidden_size=hidden,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=kv,
        vocab_size=vocab,
        seq_length=args.seq_length,
        position_embedding=_choice(args.position_embedding_type, ModelConfig,
                                   "position_embedding", "--position-embedding-type"),
        rotary_base=args.rotary_base,
        activation=activation,
        normalization=_choice(args.normalization, ModelConfig, "normalization",
                              "--normalization"),
        norm_epsilon=args.layernorm_epsilon,
        init_std=args.init_method_std,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        moe=moe,
        mamba=mamba_config_from_args(args),
        recurrent=recurrent_config_from_args(args),
        gdn=gdn,
    )


__all__ = [
    "MAMBA_FLAGS",
    "PLASTICITY_SECTIONS",
    "R_FLAGS",
    "add_megacpp_args",
    "mamba_config_from_args",
    "model_config_from_args",
    "plasticity_config_from_args",
    "recurrent_config_from_args",
]

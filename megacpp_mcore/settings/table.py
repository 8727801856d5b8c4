"""The one table of settings: how each setting reaches Megatron-LM.

A row (:class:`Setting`) says, for one recipe key (``model.moe.top_k``): the flag that carries
it to Megatron-LM (a stock flag, the plugin's own ``--megacpp-*`` flag, or none where it
lives in the pattern), how the flag carries the value (``kind``, ``choices``, ``emit``), the
``TransformerConfig`` field(s) it becomes (``config``, with ``config_when`` where only some
layouts build the feature), the attribute it is read back from in Megatron's parsed args, the
block families that use it, and what the native target omits or refuses. What a setting
*is* (its type, range, default and doc) is written on its field in ``config.py``; the table
never checks a value. The readers of this table are:

* ``megatron/translate.py`` emits flags from :attr:`Setting.flag` (via :meth:`Setting.flags`);
* ``model.py`` builds ``TransformerConfig`` kwargs with :func:`config_kwargs` and the
  :data:`FIXED` rows;
* ``megatron/args.py`` registers every ``--megacpp-*`` flag (:func:`plugin_rows`: the
  settings' rows and the :data:`RECIPE_ROWS` of the recipe's top level and provenance) and
  reads settings back from Megatron's args (:meth:`Setting.read`);
* the tests compare Megatron's parsed args and ``TransformerConfig`` against every row.

Adding a setting (plasticity and STP sections come next):

1. add the field to its dataclass in ``config.py``, with its doc (the string under it) and,
   when its range is not the default one (integers >= 1, numbers finite), an ``Annotated``
   type from ``schema.py`` (``NonNegativeInt``, ``UnitFloat``, ...);
2. add one row here: ``Setting("plasticity.fire_every", flag="--megacpp-fire-every")``. A
   ``--megacpp-*`` flag is registered with Megatron's parser and read back automatically (a
   switch for a bool, choices for a literal, else a value checked by the field's type); a
   row whose flag is the plugin's own *needs the plugin*: the native target refuses the
   recipe when the row emits it (emit nothing while the feature is off, via ``active``),
   unless ``stock`` names the value stock Megatron hard-codes and the recipe uses it;
3. if the setting reaches ``TransformerConfig``, name the field(s) in ``config``.

Pure Python: nothing here imports torch or Megatron.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from megacpp_mcore.settings.attention import LATENT, used_variants
from megacpp_mcore.settings.config import AUTO_HEADS, AttentionConfig, DSAConfig, MLAConfig

#: the prefix of every flag the plugin itself adds to Megatron's parser.
PLUGIN_FLAG_PREFIX = "--megacpp-"


# --------------------------------------------------------------------------- rows


def _same(value: Any, root: Any) -> Any:
    return value


@dataclass(frozen=True, eq=False)
class Setting:
    """One setting: recipe key, Megatron flag, TransformerConfig field(s), args attribute,
    families.

    ``kind`` says how the flag carries the value: ``value`` (``--flag VALUE``, nothing for
    null; a list as ``--flag V1 V2 ...``, nothing when empty), ``switch`` (``--flag`` when
    true), ``negated`` (``--flag`` when false) or ``choice`` (``choices`` maps each value to
    its flag, None: Megatron's default, no flag), ``truth`` (``--flag true|false``), and, in
    :data:`RECIPE_ROWS` only, ``recipe`` and ``provenance`` (``--flag VALUE`` written by the
    translator from the layout, the backend choice or the recipe file). ``active(root)``
    false: the setting's feature is off and it travels in no flag (nothing for the native
    target to refuse). ``emit`` replaces that for the few settings with a conditional or
    multi-flag form: it
    gets ``(value, root)`` (``root`` has the recipe's sections as attributes) and returns
    ``[(flag, *values), ...]``. ``read`` replaces the default read-back from args.
    ``config`` maps TransformerConfig field -> ``f(value, root)`` (pure Python values; the
    model builder turns activation and dtype names into torch objects); ``config_when(root)``
    false: the layout does not build the feature, and the row sets no field. A plugin flag is
    refused by the native target unless the value is ``stock`` (what stock Megatron
    hard-codes) or ``native_omits`` says why a native run does without it; ``native_hint``
    is the way out the refusal names. ``argparse`` holds what registering a plugin flag
    takes beyond the field's type, default and doc (``metavar``, ``default``); ``of(root)``
    is the value the flag carries where it is not the key's own (the recipe's file, or its
    name for a recipe built in Python).
    """

    key: str
    flag: str | None = None
    kind: str = "value"
    choices: dict[Any, str | None] = field(default_factory=dict)
    attr: str | None = None
    config: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    families: str = ""
    config_when: Callable[[Any], bool] | None = None
    reason: str | None = None
    stock: Any = None
    emit: Callable[[Any, Any], list[tuple]] | None = None
    active: Callable[[Any], bool] | None = None
    read_args: Callable[[Any], Any] | None = None
    native_omits: str | None = None
    native_hint: str | None = None
    argparse: dict[str, Any] = field(default_factory=dict)
    of: Callable[[Any], Any] | None = None

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]

    @property
    def plugin_only(self) -> bool:
        """The flag is the plugin's own: stock Megatron-LM does not know it."""
        return bool(self.flag and self.flag.startswith(PLUGIN_FLAG_PREFIX))

    @property
    def dest(self) -> str | None:
        """The attribute of Megatron's parsed args that holds the value."""
        if self.attr:
            return self.attr
        return self.flag.lstrip("-").replace("-", "_") if self.flag else None

    def value(self, root: Any) -> Any:
        """This setting's value in ``root`` (an object with the recipe's sections)."""
        if self.of is not None:
            return self.of(root)
        node = root
        for part in self.key.split("."):
            node = getattr(node, part)
        return node

    def used_by(self, letters: Iterable[str]) -> bool:
        """Whether a model with these block letters uses this setting."""
        return not self.families or any(x in self.families for x in letters)

    def config_fields(self, root: Any) -> dict[str, Callable[[Any, Any], Any]]:
        """The TransformerConfig fields this row sets for ``root`` (none where the layout
        does not build its feature)."""
        if self.config_when is not None and not self.config_when(root):
            return {}
        return self.config

    def flags(self, root: Any) -> list[tuple]:
        """``[(flag, *values), ...]`` this setting emits for ``root``."""
        value = self.value(root)
        if self.active is not None and not self.active(root):
            return []
        if self.emit is not None:
            return self.emit(value, root)
        if self.flag is None and self.kind != "choice":
            return []
        if self.kind == "value":
            if isinstance(value, tuple):
                return [(self.flag, *value)] if value else []
            return [] if value is None else [(self.flag, value)]
        if self.kind == "switch":
            return [(self.flag,)] if value else []
        if self.kind == "negated":
            return [] if value else [(self.flag,)]
        if self.kind == "truth":
            return [(self.flag, "true" if value else "false")]
        if self.kind in ("recipe", "provenance"):
            return [] if value is None else [(self.flag, value)]
        flag = self.choices[value]
        return [] if flag is None else [(flag,)]

    def read(self, args: Any) -> Any:
        """The setting's value from Megatron's parsed ``args``."""
        if self.read_args is not None:
            return self.read_args(args)
        if self.kind == "choice":
            for value, flag in self.choices.items():
                if flag is not None and getattr(args, _dest(flag), False):
                    return value
            return next(v for v, f in self.choices.items() if f is None)
        raw = getattr(args, self.dest)
        if isinstance(raw, list):  # a list setting (nargs) is a tuple in the settings
            raw = tuple(raw)
        if self.kind == "switch":
            return bool(raw)
        if self.kind == "negated":
            return not raw
        if self.kind == "truth":
            return raw == "true"
        return raw


@dataclass(frozen=True)
class Fixed:
    """A TransformerConfig field the project always sets, with the flag that sets it the
    same way in Megatron's launcher path (None: Megatron's default already agrees).

    ``value(root, cuda)`` gives the field's value; ``cuda`` is whether the model is built
    on a GPU (some fused kernels exist only there). ``when(root)`` false: the layout does not
    build what the field configures (MLA), and it is not set.
    """

    config: str
    flag: str | None
    value: Callable[[Any, bool], Any]
    reason: str
    plugin_only_flag: bool = False
    when: Callable[[Any], bool] | None = None

    def applies(self, root: Any) -> bool:
        """Whether the field is set for ``root``."""
        return self.when is None or self.when(root)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _single(value: Any) -> Any:
    """Megatron keeps a few MoE settings as per-layer lists; this project builds one value."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


# special forms -------------------------------------------------------------


def _query_groups_flags(value: Any, root: Any) -> list[tuple]:
    if value is None:
        return []
    return [("--group-query-attention",), ("--num-query-groups", value)]


def _read_query_groups(args: Any) -> Any:
    return args.num_query_groups if args.group_query_attention else None


def _read_kv_channels(args: Any) -> Any:
    kv, heads, hidden = args.kv_channels, args.num_attention_heads, args.hidden_size
    if kv is not None and heads and hidden % heads == 0 and kv == hidden // heads:
        return None  # Megatron fills in hidden_size / heads during validation
    return kv


def _read_vocab(args: Any) -> Any:
    return args.vocab_size if args.vocab_size is not None else args.padded_vocab_size


def _seq_flags(value: Any, root: Any) -> list[tuple]:
    return [("--seq-length", value), ("--max-position-embeddings", value)]


def _rotary_flags(value: Any, root: Any) -> list[tuple]:
    return [("--rotary-base", value)] if root.model.position_embedding == "rope" else []


def _fsdp_flags(value: Any, root: Any) -> list[tuple]:
    if value == "torch_fsdp2":
        return [("--use-torch-fsdp2",)]
    if value == "megatron_fsdp":
        return [("--use-megatron-fsdp",), ("--ckpt-format", "fsdp_dtensor")]
    return []


def _read_fsdp(args: Any) -> str:
    if args.use_torch_fsdp2:
        return "torch_fsdp2"
    return "megatron_fsdp" if args.use_megatron_fsdp else "none"


def _read_distributed_optimizer(args: Any) -> bool:
    # Megatron-FSDP turns the distributed optimizer on by itself
    return bool(args.use_distributed_optimizer) and not args.use_megatron_fsdp


def _grad_reduce_flags(value: Any, root: Any) -> list[tuple]:
    dtype = root.precision.params_dtype
    if dtype == "fp32":
        return []
    if value:
        return [("--accumulate-allreduce-grads-in-fp32",)]
    return [("--grad-reduce-in-bf16",)] if dtype == "bf16" else []


def _read_grad_reduce(args: Any) -> bool:
    if not (args.bf16 or args.fp16):
        return True
    return bool(args.accumulate_allreduce_grads_in_fp32)


def _eval_interval_flags(value: Any, root: Any) -> list[tuple]:
    # null: Megatron divides by eval_interval when sizing datasets, so it gets train_iters,
    # and --eval-iters 0 turns validation off
    return [("--eval-interval", root.training.train_iters if value is None else value)]


def _read_eval_interval(args: Any) -> Any:
    return None if args.eval_iters == 0 else args.eval_interval


def _eval_iters_flags(value: Any, root: Any) -> list[tuple]:
    return [("--eval-iters", 0 if root.training.eval_interval is None else value)]


def _read_eval_iters(args: Any) -> Any:
    return args.eval_iters


def _source_flags(value: Any, root: Any) -> list[tuple]:
    if value == "mock":
        return [("--mock-data",)]
    if value == "path":
        return [("--data-path", *root.data.paths)]
    return [("--megacpp-data", "embedded")]


def _read_source(args: Any) -> str:
    if getattr(args, "megacpp_data", None):
        return args.megacpp_data
    return "mock" if args.mock_data else "path"


def _receipt_flags(value: Any, root: Any) -> list[tuple]:
    return [("--megacpp-receipt", value.rstrip("/") + "/")]


def _none(value: Any, root: Any) -> list[tuple]:
    return []


def _stp_row(name: str, flag: str, **kwargs: Any) -> Setting:
    """An STP setting: it travels only while STP is on."""
    return Setting(f"stp.{name}", flag, active=lambda root: root.stp.enabled,
                   native_omits="STP needs the plugin (stp.enabled is refused by --target "
                   "native)", **kwargs)


def _mamba3_row(name: str, flag: str, kind: str = "value", **kwargs: Any) -> Setting:
    """A Mamba-3 setting: it travels only while model.mamba.variant is mamba3."""
    return Setting(f"model.mamba.{name}", flag, kind=kind, families="M",
                   active=lambda root: root.model.mamba.variant == "mamba3",
                   native_omits="a Mamba-3 setting (model.mamba.variant mamba3 is refused by "
                   "--target native)", **kwargs)


def _ngram_row(name: str, kind: str = "value") -> Setting:
    """An n-gram hash setting: it travels only while the features are enabled."""
    flag = "--megacpp-ngram-hash" + ("" if name == "enabled" else "-" + name.replace("_", "-"))
    omits = None if name == "enabled" else (
        "an n-gram hash setting (model.ngram_hash.enabled is refused by --target native)")
    return Setting(f"model.ngram_hash.{name}", flag, kind=kind,
                   active=lambda root: root.model.ngram_hash.enabled,
                   stock=False if name == "enabled" else None, native_omits=omits,
                   reason="the plugin's embedding extension (layers/ngram_hash.py)")


# attention variants (per A position; the positions travel in the pattern) --------------

def _latent(root: Any) -> set[str]:
    """The multi-latent variants (mla, dsa) the recipe ``root`` builds (native or plugin)."""
    built = root.lowered_layout
    if not built.has("A"):
        return set()
    return used_variants(built, root.model.attention, root.layout) & set(LATENT)


#: why the per-position attention settings have no flag of their own
_IN_THE_PLAN = ("the variant of every A position travels in the per-layer plan "
                "(--megacpp-plan, megacpp_mcore.plan) and as its symbol ('*' gqa, '+' mla, "
                "'D' dsa) in --hybrid-layer-pattern; Megatron's args do not spell it back as "
                "these settings")


def _attention_row(name: str) -> Setting:
    """A per-position attention setting: carried by the plan, read back as its default."""
    default = next(f.default for f in dataclasses.fields(AttentionConfig) if f.name == name)
    return Setting(f"model.attention.{name}", emit=_none, families="A",
                   read_args=lambda a: default, reason=_IN_THE_PLAN)


def _section_default(section: str, name: str) -> Any:
    cls = {"mla": MLAConfig, "dsa": DSAConfig}[section]
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _builds_mla(root: Any) -> bool:
    """The recipe ``root`` builds Megatron's MLA (mla or dsa positions)."""
    return bool(_latent(root))


def _builds_dsa(root: Any) -> bool:
    """The recipe ``root`` builds DSA positions."""
    return "dsa" in _latent(root)


def _latent_row(section: str, name: str, flag: str, attr: str | None = None,
                kind: str = "value", config: str | None = None) -> Setting:
    """An MLA (section mla: every mla/dsa model) or DSA (section dsa) size: its Megatron
    flag is emitted, and its TransformerConfig field ``config`` set, only when the layout
    builds that variant; read back as the default when Megatron's args do not build it."""
    needs = {"mla": {"mla", "dsa"}, "dsa": {"dsa"}}[section]
    dest = attr or flag.lstrip("-").replace("-", "_")

    def emit(value: Any, root: Any) -> list[tuple]:
        if not (_latent(root) & needs) or value is None:
            return []
        if kind == "negated":
            return [] if value else [(flag,)]
        return [(flag, value)]

    def read(args: Any) -> Any:
        on = (getattr(args, "experimental_attention_variant", None) == "dsa"
              if section == "dsa" else getattr(args, "multi_latent_attention", False))
        if not on:
            return _section_default(section, name)
        raw = getattr(args, dest)
        if kind == "negated":
            return bool(raw)
        if name == "rope_type":
            return raw or "yarn"  # Megatron's MLA default without --rope-type
        if name == "indexer_loss_coeff":
            return _section_default(section, name) if raw is None else float(raw)
        return raw

    return Setting(f"model.attention.{section}.{name}", flag, kind=kind, families="A",
                   emit=emit, read_args=read, config={config: _same} if config else {},
                   config_when=_builds_mla if section == "mla" else _builds_dsa)


def _multi_latent_flags(value: Any, root: Any) -> list[tuple]:
    latent = _latent(root)
    flags: list[tuple] = [("--multi-latent-attention",)] if latent else []
    if "dsa" in latent:
        flags.append(("--experimental-attention-variant", "dsa"))
    return flags


# R (plugin) rows with non-scalar flag values ----------------------------------------

def _r_heads_flags(value: Any, root: Any) -> list[tuple]:
    return [("--megacpp-r-num-heads", AUTO_HEADS if value is None else value)]


def _plasticity_row(section: str, name: str) -> Setting:
    """A plasticity setting: it travels only while its tool is scheduled (a step list for
    FIRE, a cadence for DASH and ReDo)."""

    def scheduled(root: Any) -> bool:
        tool = getattr(root.plasticity, section)
        return bool(tool.steps) if section == "fire" else tool.every is not None

    return Setting(f"plasticity.{section}.{name}",
                   f"--megacpp-plasticity-{section}-{name.replace('_', '-')}",
                   active=scheduled,
                   reason="the plugin's training hooks (megacpp_mcore/plasticity/)")


_DEFAULT_DROPOUT = "explicit: Megatron's default is 0.1"
_MAMBA_PLUGIN = "Megatron has no flag for it; the plugin's Mamba-2 mixer reads it"

#: every setting, in the order flags are emitted. Keys of the top-level recipe fields that
#: live in the pattern (pattern, depth, mtp_depths) or in the backend choice carry no flag
#: here; the translator emits them from the layout.
SETTINGS: tuple[Setting, ...] = (
    # ---- the recipe's top level (flags come from the layout and the backend)
    Setting("depth"),
    Setting("mtp_depths"),
    # ---- model shape (every model)
    Setting("model.hidden_size", "--hidden-size", config={"hidden_size": _same}),
    Setting("model.ffn_hidden_size", "--ffn-hidden-size", config={"ffn_hidden_size": _same}),
    Setting("model.num_attention_heads", "--num-attention-heads",
            config={"num_attention_heads": _same}),
    Setting("model.num_query_groups", "--num-query-groups", emit=_query_groups_flags,
            read_args=_read_query_groups,
            config={"num_query_groups": lambda v, r: r.model.query_groups}),
    Setting("model.kv_channels", "--kv-channels", read_args=_read_kv_channels,
            config={"kv_channels": lambda v, r: r.model.head_dim}),
    Setting("model.vocab_size", "--vocab-size", read_args=_read_vocab,
            reason="Megatron pads the embedding to a multiple of 128 x TP"),
    Setting("model.seq_length", "--seq-length", emit=_seq_flags,
            reason="the longest position is the training sequence length"),
    Setting("model.position_embedding", "--position-embedding-type",
            attr="position_embedding_type"),
    Setting("model.rotary_base", "--rotary-base", emit=_rotary_flags,
            config={"rotary_base": _same}, config_when=_builds_mla),  # MLA's config has it
    Setting("model.activation", kind="choice",
            choices={"swiglu": "--swiglu", "squared_relu": "--squared-relu", "gelu": None},
            config={"activation_func": _same,
                    "gated_linear_unit": lambda v, r: v == "swiglu"}),
    Setting("model.normalization", "--normalization", config={"normalization": _same}),
    Setting("model.norm_epsilon", "--norm-epsilon", attr="layernorm_epsilon",
            config={"layernorm_epsilon": _same}),
    Setting("model.init_std", "--init-method-std", config={"init_method_std": _same}),
    Setting("model.tie_embeddings", "--untie-embeddings-and-output-weights", kind="negated"),
    Setting("model.hidden_dropout", "--hidden-dropout", config={"hidden_dropout": _same},
            reason=_DEFAULT_DROPOUT),
    Setting("model.attention_dropout", "--attention-dropout",
            config={"attention_dropout": _same}, reason=_DEFAULT_DROPOUT),
    # ---- A: attention variants per position (pattern symbols) and MLA / DSA sizes
    Setting("model.attention.variant", emit=_multi_latent_flags, families="A",
            read_args=lambda a: AttentionConfig.variant, reason=_IN_THE_PLAN),
    *(_attention_row(name) for name in ("mla_ranks", "dsa_ranks", "mla_layers", "dsa_layers",
                                        "mtp_variant")),
    _latent_row("mla", "q_lora_rank", "--q-lora-rank", config="q_lora_rank"),
    _latent_row("mla", "kv_lora_rank", "--kv-lora-rank", config="kv_lora_rank"),
    _latent_row("mla", "qk_head_dim", "--qk-head-dim", config="qk_head_dim"),
    _latent_row("mla", "qk_pos_emb_head_dim", "--qk-pos-emb-head-dim",
                config="qk_pos_emb_head_dim"),
    _latent_row("mla", "v_head_dim", "--v-head-dim", config="v_head_dim"),
    _latent_row("mla", "rope_type", "--rope-type", config="rope_type"),
    _latent_row("dsa", "indexer_heads", "--dsa-indexer-n-heads", config="dsa_indexer_n_heads"),
    _latent_row("dsa", "indexer_head_dim", "--dsa-indexer-head-dim",
                config="dsa_indexer_head_dim"),
    _latent_row("dsa", "top_k", "--dsa-indexer-topk", config="dsa_indexer_topk"),
    _latent_row("dsa", "indexer_loss_coeff", "--dsa-indexer-loss-coeff",
                config="dsa_indexer_loss_coeff"),
    _latent_row("dsa", "rotate_activation", "--no-dsa-indexer-rotate-activation",
                attr="dsa_indexer_rotate_activation", kind="negated"),
    # ---- E: mixture of experts
    Setting("model.moe.num_experts", "--num-experts", families="E",
            config={"num_moe_experts": _same}),
    Setting("model.moe.top_k", "--moe-router-topk", families="E",
            config={"moe_router_topk": _same}),
    Setting("model.moe.ffn_hidden_size", "--moe-ffn-hidden-size", families="E",
            config={"moe_ffn_hidden_size": _same}),
    Setting("model.moe.shared_expert_ffn_hidden_size", "--moe-shared-expert-intermediate-size",
            families="E", config={"moe_shared_expert_intermediate_size": _same}),
    Setting("model.moe.router_load_balancing", "--moe-router-load-balancing-type",
            families="E", config={"moe_router_load_balancing_type": _same},
            read_args=lambda a: _single(a.moe_router_load_balancing_type)),
    Setting("model.moe.aux_loss_coeff", "--moe-aux-loss-coeff", families="E",
            config={"moe_aux_loss_coeff": _same},
            reason="explicit: Megatron's default is 0.0",
            read_args=lambda a: float(_single(a.moe_aux_loss_coeff))),
    Setting("model.moe.router_score_function", "--moe-router-score-function", families="E",
            config={"moe_router_score_function": _same}),
    Setting("model.moe.grouped_gemm", "--moe-grouped-gemm", kind="switch", families="E",
            config={"moe_grouped_gemm": _same}),
    Setting("model.moe.token_dispatcher", "--moe-token-dispatcher-type", families="E",
            config={"moe_token_dispatcher_type": _same}),
    Setting("model.moe.router_dtype", "--moe-router-dtype", families="E",
            config={"moe_router_dtype": _same}),
    Setting("model.moe.permute_fusion", "--moe-permute-fusion", kind="switch", families="E",
            config={"moe_permute_fusion": _same}),
    Setting("model.moe.expert_gemm", "--megacpp-moe-expert-gemm", families="E",
            reason="the plugin's expert kernel (layers/grouped_experts.py)",
            native_omits="a kernel choice: stock Megatron runs its grouped experts with TE's "
                         "GroupedLinear, the same model and parameters"),
    # ---- M: Mamba-2
    Setting("model.mamba.state_dim", "--mamba-state-dim", families="M",
            config={"mamba_state_dim": _same}),
    Setting("model.mamba.head_dim", "--mamba-head-dim", families="M",
            config={"mamba_head_dim": _same}),
    Setting("model.mamba.num_groups", "--mamba-num-groups", families="M",
            config={"mamba_num_groups": _same}),
    Setting("model.mamba.num_heads", "--mamba-num-heads", families="M",
            config={"mamba_num_heads": _same}),
    Setting("model.mamba.conv_kernel", "--megacpp-mamba-conv-kernel", families="M", stock=4,
            reason=_MAMBA_PLUGIN),
    Setting("model.mamba.chunk_size", "--megacpp-mamba-chunk-size", families="M", stock=128,
            reason=_MAMBA_PLUGIN),
    Setting("model.mamba.variant", "--megacpp-mamba-variant", families="M", stock="mamba2",
            reason="the plugin builds Mamba-3 (mamba-ssm's SISO scan); stock Megatron's M is "
            "Mamba-2 only"),
    _mamba3_row("rope_fraction", "--megacpp-mamba-rope-fraction"),
    _mamba3_row("mimo", "--megacpp-mamba-mimo", kind="switch"),
    _mamba3_row("mimo_rank", "--megacpp-mamba-mimo-rank"),
    # ---- R: recurrent (plugin only)
    Setting("model.recurrent.num_heads", "--megacpp-r-num-heads", families="R",
            emit=_r_heads_flags,
            read_args=lambda a: None if a.megacpp_r_num_heads == AUTO_HEADS else (
                a.megacpp_r_num_heads)),
    Setting("model.recurrent.k_head_dim", "--megacpp-r-k-head-dim", families="R"),
    Setting("model.recurrent.v_head_dim", "--megacpp-r-v-head-dim", families="R"),
    Setting("model.recurrent.conv_kernel", "--megacpp-r-conv-kernel", families="R"),
    Setting("model.recurrent.backward_chunk", "--megacpp-r-backward-chunk", families="R"),
    Setting("model.recurrent.qk_heads", "--megacpp-r-qk-heads", families="R"),
    Setting("model.recurrent.in_proj_order", "--megacpp-r-in-proj-order", families="R"),
    Setting("model.recurrent.skip_scale", "--megacpp-r-skip-scale", families="R"),
    Setting("model.recurrent.norm", "--megacpp-r-norm", families="R"),
    Setting("model.recurrent.proj_init", "--megacpp-r-proj-init", families="R"),
    Setting("model.recurrent.forget_bf16", "--megacpp-r-forget-bf16", families="R",
            kind="truth"),
    # ---- G: Gated DeltaNet
    Setting("model.gdn.num_key_heads", "--linear-num-key-heads", families="G",
            config={"linear_num_key_heads": _same}),
    Setting("model.gdn.num_value_heads", "--linear-num-value-heads", families="G",
            config={"linear_num_value_heads": _same}),
    Setting("model.gdn.key_head_dim", "--linear-key-head-dim", families="G",
            config={"linear_key_head_dim": _same}),
    Setting("model.gdn.value_head_dim", "--linear-value-head-dim", families="G",
            config={"linear_value_head_dim": _same}),
    Setting("model.gdn.conv_kernel", "--linear-conv-kernel-dim", families="G",
            config={"linear_conv_kernel_dim": _same}),
    # ---- parallel
    Setting("parallel.tensor", "--tensor-model-parallel-size",
            config={"tensor_model_parallel_size": _same}),
    Setting("parallel.pipeline", "--pipeline-model-parallel-size",
            config={"pipeline_model_parallel_size": _same}),
    Setting("parallel.expert", "--expert-model-parallel-size",
            config={"expert_model_parallel_size": _same}),
    Setting("parallel.context", "--context-parallel-size",
            config={"context_parallel_size": _same}),
    Setting("parallel.sequence_parallel", "--sequence-parallel", kind="switch",
            config={"sequence_parallel": _same}),
    Setting("parallel.distributed_optimizer", "--use-distributed-optimizer", kind="switch",
            read_args=_read_distributed_optimizer),
    Setting("parallel.fsdp", emit=_fsdp_flags, read_args=_read_fsdp,
            reason="Megatron-FSDP requires the fsdp_dtensor checkpoint format"),
    # ---- precision
    Setting("precision.params_dtype", kind="choice",
            choices={"bf16": "--bf16", "fp16": "--fp16", "fp32": None},
            config={"params_dtype": _same, "bf16": lambda v, r: v == "bf16",
                    "fp16": lambda v, r: v == "fp16"}),
    Setting("precision.grad_reduce_in_fp32", emit=_grad_reduce_flags,
            read_args=_read_grad_reduce),
    # ---- training schedule and optimizer
    Setting("training.micro_batch_size", "--micro-batch-size"),
    Setting("training.global_batch_size", "--global-batch-size"),
    Setting("training.train_iters", "--train-iters"),
    Setting("training.lr", "--lr"),
    Setting("training.min_lr", "--min-lr"),
    Setting("training.lr_warmup_iters", "--lr-warmup-iters"),
    Setting("training.lr_decay_style", "--lr-decay-style"),
    Setting("training.weight_decay", "--weight-decay"),
    Setting("training.adam_beta1", "--adam-beta1"),
    Setting("training.adam_beta2", "--adam-beta2"),
    Setting("training.clip_grad", "--clip-grad"),
    Setting("training.seed", "--seed"),
    Setting("training.log_interval", "--log-interval"),
    Setting("training.save_interval", "--save-interval",
            reason="checkpoints are written only where the launcher passes --save"),
    Setting("training.eval_interval", "--eval-interval", emit=_eval_interval_flags,
            read_args=_read_eval_interval),
    Setting("training.eval_iters", "--eval-iters", emit=_eval_iters_flags,
            read_args=_read_eval_iters),
    # ---- data (the tokenizer flags are the translator's: they combine data and vocab)
    Setting("data.source", "--megacpp-data", emit=_source_flags, read_args=_read_source,
            argparse={"default": None},
            native_hint="the embedded corpus is prepared by the plugin's launcher; for stock "
            "Megatron-LM write it as an indexed dataset (megacpp data prepare --embedded) and "
            "use data.source path with data.paths set to the printed prefix, or data.source "
            "mock"),
    Setting("data.paths", emit=_none,
            read_args=lambda a: tuple(a.data_path) if a.data_path and not getattr(
                a, "megacpp_data", None) else ()),
    Setting("data.split", "--split"),
    Setting("data.tokenizer", emit=_none, read_args=lambda a: None if a.mock_data else "byte"),
    # ---- logging
    Setting("logging.receipt_dir", "--megacpp-receipt", emit=_receipt_flags,
            read_args=lambda a: a.megacpp_receipt,
            reason="one receipt file per run in this folder",
            native_omits="receipts are written by the plugin launcher (plugin target)",
            argparse={"default": None, "metavar": "PATH"}),
    Setting("logging.tensorboard_dir", "--tensorboard-dir"),
    # ---- n-gram hash features on the token embeddings (plugin only)
    _ngram_row("enabled", kind="switch"),
    _ngram_row("orders"),
    _ngram_row("tables_per_order"),
    _ngram_row("table_size"),
    _ngram_row("embed_dim"),
    _ngram_row("hash_seed"),
    # ---- plasticity (plugin only: the training hooks in megacpp_mcore/plasticity/)
    _plasticity_row("fire", "steps"),
    _plasticity_row("fire", "mode"),
    _plasticity_row("fire", "method"),
    _plasticity_row("fire", "rewarmup_iters"),
    _plasticity_row("dash", "every"),
    _plasticity_row("dash", "start"),
    _plasticity_row("dash", "lam"),
    _plasticity_row("dash", "alpha"),
    _plasticity_row("redo", "every"),
    _plasticity_row("redo", "start"),
    _plasticity_row("redo", "tau"),
    _plasticity_row("redo", "beta"),
    # ---- STP auxiliary loss (plugin only: the training hook in megacpp_mcore/stp.py)
    Setting("stp.enabled", "--megacpp-stp", kind="switch",
            reason="the plugin's training hook adds the STP loss"),
    _stp_row("weight", "--megacpp-stp-weight"),
    _stp_row("start_step", "--megacpp-stp-start-step"),
    _stp_row("ramp_steps", "--megacpp-stp-ramp-steps"),
    _stp_row("triples", "--megacpp-stp-triples"),
    _stp_row("min_gap", "--megacpp-stp-min-gap"),
    _stp_row("layers", "--megacpp-stp-layers"),
    _stp_row("form", "--megacpp-stp-form"),
)

BY_KEY: dict[str, Setting] = {row.key: row for row in SETTINGS}

#: TransformerConfig fields set the same way on both paths (build_model and Megatron's
#: launcher reading the translated flags). Fused kernels that exist only on a GPU are off
#: on CPU builds.
FIXED: tuple[Fixed, ...] = (
    Fixed("add_bias_linear", "--disable-bias-linear", lambda r, cuda: False,
          "the project's blocks have no linear biases; Megatron's default adds them"),
    Fixed("gradient_accumulation_fusion", "--no-gradient-accumulation-fusion",
          lambda r, cuda: False,
          "Megatron's default fuses weight-gradient accumulation with apex's "
          "fused_weight_gradient_mlp_cuda, which fails without apex; the unfused path "
          "computes the same gradients"),
    Fixed("persist_layer_norm", "--no-persist-layer-norm", lambda r, cuda: False,
          "Megatron's default persistent layer norm is an apex kernel, which fails without "
          "apex"),
    Fixed("masked_softmax_fusion", "--no-masked-softmax-fusion", lambda r, cuda: False,
          "Megatron's default fused masked softmax needs its CUDA extension (apex-era "
          "kernels) on the local attention path, which fails without apex"),
    Fixed("apply_rope_fusion", "--no-rope-fusion", lambda r, cuda: False,
          "the plugin's layers run unfused RoPE, as its model builder does; Megatron's fused "
          "RoPE needs Transformer Engine, which a local (or auto without TE) build does not "
          "have", plugin_only_flag=True),
    # Megatron's default is on; its launcher keeps it (no flag), so the builder does on GPU.
    Fixed("bias_dropout_fusion", None, lambda r, cuda: cuda,
          "Megatron's default (a jit-fused kernel), kept on GPU"),
    # Megatron's launcher: swiglu -> --bias-swiglu-fusion (default on); any other activation
    # -> --bias-gelu-fusion, which --disable-bias-linear turns off. Megatron's fused bias
    # activation exists only for gelu, swiglu and quick_geglu.
    Fixed("bias_activation_fusion", None,
          lambda r, cuda: cuda and r.model.activation == "swiglu",
          "Megatron's launcher fuses swiglu only (no linear bias turns the gelu fusion off); "
          "its fused kernel has no squared_relu"),
    # MLA/DSA positions (one MLATransformerConfig per model): set only where they are built
    Fixed("rotary_scaling_factor", None, lambda r, cuda: 1.0,
          "Megatron-LM's --rotary-scaling-factor default (MLATransformerConfig's own is 40): "
          "the plugin builds what the native flags build", when=_builds_mla),
    Fixed("experimental_attention_variant", None, lambda r, cuda: "dsa",
          "DSA positions: --experimental-attention-variant dsa, emitted by the "
          "model.attention.variant row", when=_builds_dsa),
)

#: --megacpp-* flags of the recipe's top level and of its provenance. The translator writes
#: them itself (from the layout, the backend choice and the recipe file, at their place in
#: the command line), so they are not in :data:`SETTINGS`, whose rows it emits in order;
#: megatron/args.py registers them with the settings' plugin flags. ``recipe`` rows carry a
#: recipe field (the layout as the per-layer plan, the backend asked for); ``provenance``
#: rows say where the flags came from, for receipts (the flags themselves are
#: authoritative).
RECIPE_ROWS: tuple[Setting, ...] = (
    Setting("pattern", "--megacpp-plan", kind="recipe", emit=_none,
            argparse={"default": None, "metavar": "PLAN"},
            reason="the per-layer plan (megacpp_mcore.plan): one token per layer of "
            "--hybrid-layer-pattern, its letter (A E M F R G) and variant (A:gqa, A:mla, "
            "A:dsa, M:mamba2, M:mamba3, R:m2rnn), '|' between stages and '/' before each MTP "
            "part; R layers travel in Megatron's G slot there, and this flag tells the "
            "plugin's stack R from G"),
    Setting("backend", "--megacpp-backend", kind="recipe", emit=_none,
            argparse={"default": None},
            reason="the backend the recipe asked for; --transformer-impl is what Megatron "
            "builds. Recorded in receipts next to what actually ran"),
    Setting("source", "--megacpp-recipe", kind="provenance", emit=_none,
            of=lambda r: r.source or r.name, argparse={"metavar": "PATH"},
            reason="the recipe the flags were translated from (provenance for receipts; the "
            "flags themselves are authoritative)"),
    Setting("recipe_hash", "--megacpp-recipe-hash", kind="provenance", emit=_none,
            argparse={"metavar": "SHA256"},
            reason="sha256 of the fully resolved recipe (overrides included), for receipts"),
)


def rows(prefix: str = "") -> tuple[Setting, ...]:
    """The rows whose key starts with ``prefix`` (``"model."``, ``"model.moe."``)."""
    return tuple(row for row in SETTINGS if row.key.startswith(prefix))


def plugin_rows() -> tuple[Setting, ...]:
    """Rows carried by the plugin's own flags (every one registered with Megatron's parser):
    the recipe's top level and provenance first, then the settings'."""
    return tuple(row for row in (*RECIPE_ROWS, *SETTINGS) if row.plugin_only)


#: the recipe sections whose rows may set TransformerConfig fields
CONFIG_SECTIONS = ("model", "precision", "parallel")


def config_kwargs(root: Any, letters: str) -> dict[str, Any]:
    """TransformerConfig kwargs from every row whose families ``letters`` use and whose
    feature the layout builds (pure Python values; ``root`` has the recipe's ``model``,
    ``precision``, ``parallel``, ``layout`` and ``lowered_layout``)."""
    kwargs: dict[str, Any] = {}
    for row in SETTINGS:
        if row.key.partition(".")[0] in CONFIG_SECTIONS and row.used_by(letters):
            fields = row.config_fields(root)
            if fields:
                value = row.value(root)
                kwargs.update({name: make(value, root) for name, make in fields.items()})
    return kwargs


__all__ = [
    "BY_KEY",
    "CONFIG_SECTIONS",
    "FIXED",
    "PLUGIN_FLAG_PREFIX",
    "RECIPE_ROWS",
    "SETTINGS",
    "Fixed",
    "Setting",
    "config_kwargs",
    "plugin_rows",
    "rows",
]

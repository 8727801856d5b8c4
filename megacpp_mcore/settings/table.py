"""The one table of settings: each setting written once, read by everything that maps it.

A row (:class:`Setting`) says, for one recipe key (``model.moe.top_k``): the flag that carries
it to Megatron-LM (a stock flag, the plugin's own ``--megacpp-*`` flag, or none where it
lives in the pattern), the ``TransformerConfig`` field(s) it becomes, the attribute it is read
back from in Megatron's parsed args, the block families that use it, and its check. The
readers of this table are:

* ``megatron/translate.py`` emits flags from :attr:`Setting.flag` (via :func:`flags_for`);
* ``model.py`` builds ``TransformerConfig`` kwargs from :attr:`Setting.config` and the
  :data:`FIXED` rows;
* ``megatron/args.py`` registers every ``--megacpp-*`` flag and reads settings back from
  Megatron's args (:meth:`Setting.read`);
* ``settings/config.py`` runs :func:`value_problem` in every dataclass's ``__post_init__``,
  so a setting is checked on every construction path (YAML, Python, Megatron's ``--spec``
  seam), not only when a recipe file is loaded;
* the tests compare Megatron's parsed args and ``TransformerConfig`` against every row.

Validation sits in ``__post_init__`` of plain frozen dataclasses rather than pydantic v2
dataclasses: pydantic is not a dependency of Megatron-Core, the rules are a handful of
ranges per key, and the strict YAML loader keeps its own messages (file and ``--set``
origin) while the same rule objects guard direct construction.

Adding a setting (plasticity and STP sections come next):

1. add the field to its dataclass in ``config.py``, documented in its ``Attributes:`` list;
2. add one row here: ``Setting("plasticity.fire_every", flag="--megacpp-fire-every",
   check=POSITIVE)``. A ``--megacpp-*`` flag is registered with Megatron's parser and read
   back automatically (a switch for a bool, choices for a literal, else a value checked by
   the row's check); a row whose flag is the plugin's own *needs the plugin*: the native
   target refuses the recipe when the row emits it (emit nothing while the feature is off,
   via ``emit``), unless ``stock`` names the value stock Megatron hard-codes and the recipe
   uses it;
3. if the setting reaches ``TransformerConfig``, name the field(s) in ``config``.

Pure Python: nothing here imports torch, Megatron or the config dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

#: the prefix of every flag the plugin itself adds to Megatron's parser.
PLUGIN_FLAG_PREFIX = "--megacpp-"


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """A single-value rule: ``rule`` is what messages show ("> 0"), ``ok`` decides."""

    rule: str
    ok: Callable[[Any], bool]


POSITIVE = Check("a positive integer (>= 1)", lambda v: v >= 1)
NON_NEGATIVE = Check(">= 0", lambda v: v >= 0)
GREATER_THAN_ZERO = Check("> 0", lambda v: v > 0)
UNIT = Check("in [0, 1)", lambda v: 0.0 <= v < 1.0)
CLIP = Check(">= 0 (0 disables clipping)", lambda v: v >= 0)


# --------------------------------------------------------------------------- rows


def _same(value: Any, root: Any) -> Any:
    return value


@dataclass(frozen=True, eq=False)
class Setting:
    """One setting: recipe key, Megatron flag, TransformerConfig field(s), args attribute,
    families, check.

    ``kind`` says how the flag carries the value: ``value`` (``--flag VALUE``, nothing for
    null; a list as ``--flag V1 V2 ...``, nothing when empty), ``switch`` (``--flag`` when
    true), ``negated`` (``--flag`` when false) or ``choice`` (``choices`` maps each value to
    its flag, None: Megatron's default, no flag). ``active(root)`` false: the setting's
    feature is off and it travels in no flag (nothing for the native target to refuse).
    ``emit`` replaces that for the few settings with a conditional or multi-flag form: it
    gets ``(value, root)`` (``root`` has the recipe's sections as attributes) and returns
    ``[(flag, *values), ...]``. ``read`` replaces the default read-back from args.
    ``config`` maps TransformerConfig field -> ``f(value, root)`` (pure Python values; the
    model builder turns activation and dtype names into torch objects). A plugin flag is
    refused by the native target unless the value is ``stock`` (what stock Megatron
    hard-codes) or ``native_omits`` says why a native run does without it; ``native_hint``
    is the way out the refusal names. ``register`` False: megatron/args.py adds the plugin
    flag by hand (its parsed form differs from the field's).
    """

    key: str
    flag: str | None = None
    kind: str = "value"
    choices: dict[Any, str | None] = field(default_factory=dict)
    attr: str | None = None
    config: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    families: str = ""
    check: Check | None = None
    reason: str | None = None
    stock: Any = None
    emit: Callable[[Any, Any], list[tuple]] | None = None
    active: Callable[[Any], bool] | None = None
    read_args: Callable[[Any], Any] | None = None
    native_omits: str | None = None
    native_hint: str | None = None
    register: bool = True

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
        node = root
        for part in self.key.split("."):
            node = getattr(node, part)
        return node

    def used_by(self, letters: Iterable[str]) -> bool:
        """Whether a model with these block letters uses this setting."""
        return not self.families or any(x in self.families for x in letters)

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
        return raw


@dataclass(frozen=True)
class Fixed:
    """A TransformerConfig field the project always sets, with the flag that sets it the
    same way in Megatron's launcher path (None: Megatron's default already agrees).

    ``value(root, cuda)`` gives the field's value; ``cuda`` is whether the model is built
    on a GPU (some fused kernels exist only there).
    """

    config: str
    flag: str | None
    value: Callable[[Any, bool], Any]
    reason: str
    plugin_only_flag: bool = False


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


def _stp_row(name: str, flag: str, check: Check | None = None, **kwargs: Any) -> Setting:
    """An STP setting: it travels only while STP is on."""
    return Setting(f"stp.{name}", flag, check=check, active=lambda root: root.stp.enabled,
                   native_omits="STP needs the plugin (stp.enabled is refused by --target "
                   "native)", **kwargs)


def _mamba3_row(name: str, flag: str, kind: str = "value", **kwargs: Any) -> Setting:
    """A Mamba-3 setting: it travels only while model.mamba.variant is mamba3."""
    return Setting(f"model.mamba.{name}", flag, kind=kind, families="M",
                   active=lambda root: root.model.mamba.variant == "mamba3",
                   native_omits="a Mamba-3 setting (model.mamba.variant mamba3 is refused by "
                   "--target native)", **kwargs)


def _ngram_row(name: str, kind: str = "value", check: Check | None = None) -> Setting:
    """An n-gram hash setting: it travels only while the features are enabled."""
    flag = "--megacpp-ngram-hash" + ("" if name == "enabled" else "-" + name.replace("_", "-"))
    omits = None if name == "enabled" else (
        "an n-gram hash setting (model.ngram_hash.enabled is refused by --target native)")
    return Setting(f"model.ngram_hash.{name}", flag, kind=kind, check=check,
                   active=lambda root: root.model.ngram_hash.enabled,
                   stock=False if name == "enabled" else None, native_omits=omits,
                   reason="the plugin's embedding extension (layers/ngram_hash.py)")


# attention variants (per A position; the positions travel in the pattern) --------------

#: Megatron hybrid symbol of an A position -> its attention variant
_SYMBOL_VARIANTS = {"*": "gqa", "+": "mla", "D": "dsa"}


def _latent(root: Any) -> set[str]:
    """The multi-latent variants (mla, dsa) the recipe ``root`` builds (native or plugin)."""
    from megacpp_mcore.settings.attention import LATENT, used_variants

    built = root.lowered_layout
    if not built.has("A"):
        return set()
    return used_variants(built, root.model.attention, root.layout) & set(LATENT)


def _attention_from_args(args: Any) -> dict[str, Any]:
    """The per-position variants read from the A symbols of --hybrid-layer-pattern ('*' gqa,
    '+' mla, 'D' dsa), listed by layer number."""
    pattern = getattr(args, "hybrid_layer_pattern", None) or ""
    main, _, mtp = pattern.partition("/")
    by_variant: dict[str, list[int]] = {"gqa": [], "mla": [], "dsa": []}
    for number, symbol in enumerate((c for c in main if c != "|"), start=1):
        if symbol in _SYMBOL_VARIANTS:
            by_variant[_SYMBOL_VARIANTS[symbol]].append(number)
    mtp_symbols = [c for c in mtp if c in _SYMBOL_VARIANTS]
    mtp_variant = _SYMBOL_VARIANTS[mtp_symbols[0]] if mtp_symbols else None
    latent = by_variant["mla"] or by_variant["dsa"]
    variant = "gqa" if by_variant["gqa"] or not latent else (
        mtp_variant or ("mla" if by_variant["mla"] else "dsa"))
    return {"variant": variant, "mla_ranks": (), "dsa_ranks": (),
            "mla_layers": tuple(by_variant["mla"]) if variant != "mla" else (),
            "dsa_layers": tuple(by_variant["dsa"]) if variant != "dsa" else (),
            "mtp_variant": mtp_variant}


def _attention_row(name: str) -> Setting:
    return Setting(f"model.attention.{name}", emit=_none, families="A",
                   check=NON_NEGATIVE if name.endswith("_ranks") else None,
                   read_args=lambda a: _attention_from_args(a)[name])


def _section_default(section: str, name: str) -> Any:
    from megacpp_mcore.settings import config

    cls = {"mla": config.MLAConfig, "dsa": config.DSAConfig}[section]
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _latent_row(section: str, name: str, flag: str, attr: str | None = None,
                kind: str = "value") -> Setting:
    """An MLA (section mla: every mla/dsa model) or DSA (section dsa) size: its Megatron
    flag is emitted only when the layout builds that variant; read back as the default
    when Megatron's args do not build it."""
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
                   emit=emit, read_args=read,
                   check=NON_NEGATIVE if name == "indexer_loss_coeff" else None)


def _multi_latent_flags(value: Any, root: Any) -> list[tuple]:
    latent = _latent(root)
    flags: list[tuple] = [("--multi-latent-attention",)] if latent else []
    if "dsa" in latent:
        flags.append(("--experimental-attention-variant", "dsa"))
    return flags


# R (plugin) rows with non-scalar flag values ----------------------------------------

#: the value --megacpp-r-num-heads takes for num_heads null (hidden // (K + V))
AUTO_HEADS = "auto"


def _r_heads_flags(value: Any, root: Any) -> list[tuple]:
    return [("--megacpp-r-num-heads", AUTO_HEADS if value is None else value)]


def _bool_value_flags(flag: str) -> Callable[[Any, Any], list[tuple]]:
    return lambda value, root: [(flag, "true" if value else "false")]


def _plasticity_row(section: str, name: str, check: Check | None = None) -> Setting:
    """A plasticity setting: it travels only while its tool is scheduled (a step list for
    FIRE, a cadence for DASH and ReDo)."""

    def scheduled(root: Any) -> bool:
        tool = getattr(root.plasticity, section)
        return bool(tool.steps) if section == "fire" else tool.every is not None

    return Setting(f"plasticity.{section}.{name}",
                   f"--megacpp-plasticity-{section}-{name.replace('_', '-')}", check=check,
                   active=scheduled,
                   reason="the plugin's training hooks (megacpp_mcore/plasticity/)")


_UNIT_OPEN_LOW = Check("in (0, 1]", lambda v: 0 < v <= 1)


_DEFAULT_DROPOUT = "explicit: Megatron's default is 0.1"
_MAMBA_PLUGIN = "Megatron has no flag for it; the plugin's Mamba-2 mixer reads it"

#: every setting, in the order flags are emitted. Keys of the top-level recipe fields that
#: live in the pattern (pattern, depth, mtp_depths) or in the backend choice carry no flag
#: here; the translator emits them from the layout.
SETTINGS: tuple[Setting, ...] = (
    # ---- the recipe's top level (flags come from the layout and the backend)
    Setting("depth", check=POSITIVE),
    Setting("mtp_depths", check=NON_NEGATIVE),
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
    Setting("model.rotary_base", "--rotary-base", emit=_rotary_flags),
    Setting("model.activation", kind="choice",
            choices={"swiglu": "--swiglu", "squared_relu": "--squared-relu", "gelu": None},
            config={"activation_func": _same,
                    "gated_linear_unit": lambda v, r: v == "swiglu"}),
    Setting("model.normalization", "--normalization", config={"normalization": _same}),
    Setting("model.norm_epsilon", "--norm-epsilon", attr="layernorm_epsilon",
            config={"layernorm_epsilon": _same}, check=GREATER_THAN_ZERO),
    Setting("model.init_std", "--init-method-std", config={"init_method_std": _same},
            check=GREATER_THAN_ZERO),
    Setting("model.tie_embeddings", "--untie-embeddings-and-output-weights", kind="negated"),
    Setting("model.hidden_dropout", "--hidden-dropout", config={"hidden_dropout": _same},
            check=UNIT, reason=_DEFAULT_DROPOUT),
    Setting("model.attention_dropout", "--attention-dropout",
            config={"attention_dropout": _same}, check=UNIT, reason=_DEFAULT_DROPOUT),
    # ---- A: attention variants per position (pattern symbols) and MLA / DSA sizes
    Setting("model.attention.variant", emit=_multi_latent_flags, families="A",
            read_args=lambda a: _attention_from_args(a)["variant"],
            reason="A positions' variants travel as '*'/'+'/'D' in --hybrid-layer-pattern"),
    *(_attention_row(name) for name in ("mla_ranks", "dsa_ranks", "mla_layers", "dsa_layers",
                                        "mtp_variant")),
    _latent_row("mla", "q_lora_rank", "--q-lora-rank"),
    _latent_row("mla", "kv_lora_rank", "--kv-lora-rank"),
    _latent_row("mla", "qk_head_dim", "--qk-head-dim"),
    _latent_row("mla", "qk_pos_emb_head_dim", "--qk-pos-emb-head-dim"),
    _latent_row("mla", "v_head_dim", "--v-head-dim"),
    _latent_row("mla", "rope_type", "--rope-type"),
    _latent_row("dsa", "indexer_heads", "--dsa-indexer-n-heads"),
    _latent_row("dsa", "indexer_head_dim", "--dsa-indexer-head-dim"),
    _latent_row("dsa", "top_k", "--dsa-indexer-topk"),
    _latent_row("dsa", "indexer_loss_coeff", "--dsa-indexer-loss-coeff"),
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
            config={"moe_aux_loss_coeff": _same}, check=NON_NEGATIVE,
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
    _mamba3_row("mimo_rank", "--megacpp-mamba-mimo-rank", check=POSITIVE),
    # ---- R: recurrent (plugin only)
    Setting("model.recurrent.num_heads", "--megacpp-r-num-heads", families="R",
            emit=_r_heads_flags, register=False,
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
            emit=_bool_value_flags("--megacpp-r-forget-bf16"), register=False,
            read_args=lambda a: a.megacpp_r_forget_bf16 == "true"),
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
    Setting("training.lr", "--lr", check=GREATER_THAN_ZERO),
    Setting("training.min_lr", "--min-lr", check=NON_NEGATIVE),
    Setting("training.lr_warmup_iters", "--lr-warmup-iters", check=NON_NEGATIVE),
    Setting("training.lr_decay_style", "--lr-decay-style"),
    Setting("training.weight_decay", "--weight-decay", check=NON_NEGATIVE),
    Setting("training.adam_beta1", "--adam-beta1", check=UNIT),
    Setting("training.adam_beta2", "--adam-beta2", check=UNIT),
    Setting("training.clip_grad", "--clip-grad", check=CLIP),
    Setting("training.seed", "--seed", check=NON_NEGATIVE),
    Setting("training.log_interval", "--log-interval"),
    Setting("training.save_interval", "--save-interval",
            reason="checkpoints are written only where the launcher passes --save"),
    Setting("training.eval_interval", "--eval-interval", emit=_eval_interval_flags,
            read_args=_read_eval_interval),
    Setting("training.eval_iters", "--eval-iters", check=NON_NEGATIVE, emit=_eval_iters_flags,
            read_args=_read_eval_iters),
    # ---- data (the tokenizer flags are the translator's: they combine data and vocab)
    Setting("data.source", emit=_source_flags, read_args=_read_source,
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
            register=False),
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
    _plasticity_row("fire", "rewarmup_iters", NON_NEGATIVE),
    _plasticity_row("dash", "every"),
    _plasticity_row("dash", "start"),
    _plasticity_row("dash", "lam", _UNIT_OPEN_LOW),
    _plasticity_row("dash", "alpha", _UNIT_OPEN_LOW),
    _plasticity_row("redo", "every"),
    _plasticity_row("redo", "start"),
    _plasticity_row("redo", "tau", UNIT),
    _plasticity_row("redo", "beta", _UNIT_OPEN_LOW),
    # ---- STP auxiliary loss (plugin only: the training hook in megacpp_mcore/stp.py)
    Setting("stp.enabled", "--megacpp-stp", kind="switch",
            reason="the plugin's training hook adds the STP loss"),
    _stp_row("weight", "--megacpp-stp-weight", NON_NEGATIVE),
    _stp_row("start_step", "--megacpp-stp-start-step"),
    _stp_row("ramp_steps", "--megacpp-stp-ramp-steps", NON_NEGATIVE),
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
)


def rows(prefix: str = "") -> tuple[Setting, ...]:
    """The rows whose key starts with ``prefix`` (``"model."``, ``"model.moe."``)."""
    return tuple(row for row in SETTINGS if row.key.startswith(prefix))


def plugin_rows() -> tuple[Setting, ...]:
    """Rows carried by the plugin's own flags (registered with Megatron's parser)."""
    return tuple(row for row in SETTINGS if row.plugin_only)


def value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is impossible for ``key`` on its own, or None.

    Integers must be >= 1 and numbers finite unless the row's check says otherwise;
    booleans, strings and nulls have no range (their types are checked by the dataclass).
    """
    key = re.sub(r"\[\d+\]$", "", key)  # an item of a list setting: the list's rule
    if isinstance(value, tuple):
        return next(filter(None, (value_problem(key, v) for v in value)), None)
    if isinstance(value, bool) or value is None or not isinstance(value, int | float):
        return None
    row = BY_KEY.get(key)
    check = row.check if row is not None else None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if check is None:
        if isinstance(value, int) and value < 1:
            return f"must be {POSITIVE.rule}, got {value}"
        return None
    if not check.ok(value):
        return f"must be {check.rule}, got {value!r}"
    return None


__all__ = [
    "AUTO_HEADS",
    "BY_KEY",
    "FIXED",
    "PLUGIN_FLAG_PREFIX",
    "SETTINGS",
    "Check",
    "Fixed",
    "Setting",
    "plugin_rows",
    "rows",
    "value_problem",
]

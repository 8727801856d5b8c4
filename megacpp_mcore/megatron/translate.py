"""Translate a recipe into Megatron-LM flags, with a plan that says where every flag came from.

Two targets:

``native``
    Only what stock Megatron-LM 0.19.2 builds with its own ``hybrid_stack_spec``: the layout
    as ``--hybrid-layer-pattern`` (A -> ``*``, E -> ``E``, M -> ``M``, F -> ``-``,
    G -> ``G``; ``|`` stages and ``/`` MTP parts kept) and every model, MoE, Mamba, GDN,
    parallel, precision and schedule flag the recipe implies. It fails closed: R layers are
    refused unless the recipe lowers them explicitly (``r_lowering``), ``backend: local`` is
    refused (the stock hybrid spec is Transformer-Engine-only), and so is any setting stock
    Megatron cannot express.
``plugin``
    The same flags, plus ``--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec`` and the
    plugin's own flags (:mod:`megacpp_mcore.megatron.args`), so every layer, R included, is
    built by this plugin. ``--hybrid-layer-pattern`` carries R in Megatron's ``G`` slot
    symbol and ``--megacpp-pattern`` gives the exact letter of every layer, so the plugin's
    stack tells R from G and never remaps silently.

Output formats: ``args`` (one shell-quoted line, for ``$(...)``), ``shell`` (a runnable
``torchrun`` launch script) and ``json`` (the :class:`Plan`: recipe and hash, target,
Megatron version, per-layer roles and the modules that build them, every flag with the
recipe field it came from or the reason it is there, lowerings, refusals, omitted settings).
Pure Python: nothing here imports torch or Megatron.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from megacpp_mcore import __version__
from megacpp_mcore.errors import TranslateError
from megacpp_mcore.layout import FAMILIES, Layer, Layout
from megacpp_mcore.megatron.args import (
    MAMBA_FLAGS,
    PLASTICITY_SECTIONS,
    R_FLAGS,
    plasticity_flag,
    plasticity_flag_value,
)
from megacpp_mcore.settings.recipe import BYTE_VOCAB_SIZE, Recipe
from megacpp_mcore.symbols import NATIVE_SYMBOLS, PLUGIN_R_SYMBOL, PLUGIN_SYMBOLS, megatron_pattern

MEGATRON_VERSION = "0.19.2"
TARGETS = ("native", "plugin")
FORMATS = ("args", "shell", "json")
#: the plugin's hybrid stack spec object, for Megatron's ``--spec MODULE NAME``.
SPEC = ("megacpp_mcore.megatron.spec_seam", "megacpp_stack_spec")
#: the Megatron pretrain launcher the shell format runs.
LAUNCHER = "scripts/pretrain_nam.py"
#: end-of-document id of the byte tokenizer (megacpp_mcore.train.data.EOD_ID): the last byte id + 1.
BYTE_EOD_ID = BYTE_VOCAB_SIZE - 1

#: letter -> (layer module, mixer module) that stock Megatron's hybrid_stack_spec builds.
NATIVE_MODULES: dict[str, tuple[str, str]] = {
    "A": ("megatron.core.transformer.transformer_layer.TransformerLayer",
          "megatron.core.transformer.attention.SelfAttention"),
    "E": ("megatron.core.transformer.transformer_layer.MoETransformerLayer",
          "megatron.core.transformer.moe.moe_layer.MoELayer"),
    "M": ("megatron.core.ssm.mamba_layer.MambaLayer",
          "megatron.core.ssm.mamba_mixer.MambaMixer"),
    "F": ("megatron.core.ssm.mlp_layer.MLPLayer",
          "megatron.core.transformer.mlp.MLP"),
    "G": ("megatron.core.transformer.transformer_layer.TransformerLayer",
          "megatron.core.ssm.gated_delta_net.GatedDeltaNet"),
}
#: letter -> the plugin's spec module that builds it (``megacpp_mcore.specs``).
PLUGIN_MODULES: dict[str, str] = {
    "A": "megacpp_mcore.specs.attention",
    "E": "megacpp_mcore.specs.moe",
    "M": "megacpp_mcore.specs.mamba",
    "F": "megacpp_mcore.specs.mlp",
    "R": "megacpp_mcore.specs.recurrent",
    "G": "megacpp_mcore.specs.gdn",
}

#: flags stock Megatron needs on a machine without apex, with the reason (REFERENCES.md).
APEX_FREE_FLAGS: dict[str, str] = {
    "--no-gradient-accumulation-fusion": (
        "Megatron's default fuses weight-gradient accumulation with apex's "
        "fused_weight_gradient_mlp_cuda, which fails without apex; the unfused path computes "
        "the same gradients"),
    "--no-persist-layer-norm": (
        "Megatron's default persistent layer norm is an apex kernel, which fails without apex"),
    "--no-masked-softmax-fusion": (
        "Megatron's default fused masked softmax needs its CUDA extension (apex-era kernels) "
        "on the local attention path, which fails without apex"),
}
_ENV_MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Flag:
    """One emitted flag: name, values, and the recipe field it came from or why it is there."""

    name: str
    values: tuple[str, ...] = ()
    source: str | None = None
    reason: str | None = None

    def argv(self) -> list[str]:
        return [self.name, *self.values]

    def to_json(self) -> dict[str, Any]:
        return {"flag": self.name, "values": list(self.values), "source": self.source,
                "reason": self.reason}


@dataclass(frozen=True)
class EnvVar:
    """An environment variable the launch needs (value None: must be unset), and why."""

    name: str
    value: str | None
    reason: str


@dataclass(frozen=True)
class Plan:
    """A translation: flags for Megatron and the record of every choice behind them."""

    recipe: Recipe
    target: str
    megatron_pattern: str
    flags: tuple[Flag, ...]
    roles: tuple[dict[str, Any], ...]
    lowerings: tuple[dict[str, Any], ...] = ()
    refusals: tuple[dict[str, Any], ...] = ()
    omitted: tuple[dict[str, Any], ...] = ()
    notes: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    nproc: int = 1
    world_note: str = ""
    command: tuple[str, ...] = field(default=())

    def argv(self) -> list[str]:
        """The flags as an argument list (what Megatron's parser receives)."""
        return [token for flag in self.flags for token in flag.argv()]

    def args_line(self) -> str:
        """The flags as one shell-quoted line."""
        return shlex.join(self.argv())

    def shell_script(self) -> str:
        """A bash launch script: ``torchrun --nproc-per-node N scripts/pretrain_nam.py ...``."""
        recipe = self.recipe
        lines = [
            "#!/usr/bin/env bash",
            f"# Generated by: {shlex.join(self.command) if self.command else 'megacpp translate'}"
            f" (megacpp-mcore {__version__})",
            f"# Recipe {recipe.name} ({recipe.where}), sha256 {recipe.recipe_hash}",
            f"# Target {self.target}, Megatron-Core {MEGATRON_VERSION}; pattern "
            f"{recipe.layout.canonical}",
            f"# Run from the repository root. {self.world_note}",
            "set -euo pipefail",
        ]
        for env in self.env:
            lines.append(f"# {env.reason}")
            if env.value is None:
                lines.append(f"unset {env.name}")
            else:
                lines.append(f"export {env.name}={shlex.quote(env.value)}")
        lines.append(f"exec torchrun --nproc-per-node {self.nproc} {LAUNCHER} \\")
        for i, flag in enumerate(self.flags):
            tail = " \\" if i < len(self.flags) - 1 else ""
            lines.append("    " + shlex.join(flag.argv()) + tail)
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON (the schema of ``megacpp translate --format json``)."""
        recipe, layout = self.recipe, self.recipe.layout
        return {
            "recipe": {"name": recipe.name, "hash": recipe.recipe_hash, "source": recipe.source,
                       "overrides": list(recipe.overrides)},
            "target": self.target,
            "megatron_version": MEGATRON_VERSION,
            "pattern": {"megacpp": layout.canonical, "megatron": self.megatron_pattern,
                        "depth": layout.depth, "stages": len(layout.stages)},
            "mtp_depths": layout.mtp_depth,
            "spec": list(SPEC) if self.target == "plugin" else None,
            "encoding": ({"R": PLUGIN_R_SYMBOL} if self.target == "plugin" else {}),
            "roles": list(self.roles),
            "lowerings": list(self.lowerings),
            "refusals": list(self.refusals),
            "omitted": list(self.omitted),
            "notes": list(self.notes),
            "flags": [flag.to_json() for flag in self.flags],
            "argv": self.argv(),
            "env": [{"name": e.name, "value": e.value, "reason": e.reason} for e in self.env],
            "launch": {"launcher": LAUNCHER, "nproc_per_node": self.nproc,
                       "note": self.world_note},
        }


# --------------------------------------------------------------------------- translation


class _Flags:
    def __init__(self) -> None:
        self.items: list[Flag] = []

    def add(self, name: str, *values: Any, source: str | None = None,
            reason: str | None = None) -> None:
        if source is None and reason is None:  # pragma: no cover - a translator bug
            raise AssertionError(f"{name}: every flag needs a source or a reason")
        self.items.append(Flag(name, tuple(_fmt(v) for v in values), source, reason))


def _fmt(value: Any) -> str:
    if isinstance(value, bool):  # pragma: no cover - booleans are flags without values
        raise TypeError("booleans are emitted as store_true flags")
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _numbers(layout: Layout, letter: str) -> str:
    main = [str(n) for n in layout.positions(letter)]
    mtp = [f"MTP depth {x.mtp_part} layer {x.number}" for x in layout.mtp_layers
           if x.letter == letter]
    return ", ".join(main + mtp)


def native_refusals(recipe: Recipe) -> list[str]:
    """Why ``recipe`` cannot be translated for the native target (empty if it can)."""
    layout = recipe.layout
    problems: list[str] = []
    if layout.has("R") and recipe.r_lowering is None:
        problems.append(
            f"R (recurrent, M2RNN) layers {_numbers(layout, 'R')} have no stock Megatron-LM "
            f"{MEGATRON_VERSION} layer: its hybrid_stack_spec builds only Megatron's symbols "
            "(M, G, *, D, +, -, E). Two ways out: --target plugin (this plugin builds R, "
            f"through --spec {' '.join(SPEC)}), or an explicit r_lowering in the recipe "
            "(r_lowering: M, or --set r_lowering=M) that lowers every R to one of M, A, F, E, G "
            "- a different model, recorded per layer in the plan"
        )
    if recipe.backend == "local":
        problems.append(
            "backend local: stock Megatron-LM's hybrid_stack_spec is Transformer-Engine-only "
            "(there is no non-TE hybrid spec, and HybridStack builds its final norm with TE); "
            "use backend auto or te for the native target, or --target plugin, which builds "
            "a local stack"
        )
    if recipe.lowered_layout.has("M"):
        mamba = recipe.model.mamba
        builtin = {"conv_kernel": ("d_conv", 4), "chunk_size": ("chunk_size", 128)}
        for name, (megatron_name, megatron_default) in builtin.items():
            value = getattr(mamba, name)
            if value != megatron_default:
                problems.append(
                    f"model.mamba.{name} ({value}): stock Megatron has no flag for it (its "
                    f"MambaMixer always uses {megatron_name}={megatron_default}); use "
                    f"{megatron_default}, or --target plugin"
                )
    if recipe.plasticity.enabled:
        problems.append(
            "plasticity (FIRE/DASH/ReDo) runs as training hooks of the plugin's launcher; "
            "stock Megatron-LM has no such seam: use --target plugin, or leave the plasticity "
            "section at its defaults")
    return problems


def world_size(recipe: Recipe) -> int:
    """The smallest world the parallel sizes fit: TP x PP x lcm(CP, EP).

    Megatron needs the world divisible by TP x PP x CP (the model-parallel block) and by
    TP x EP x PP (expert tensor parallelism defaults to TP); any multiple of this number adds
    data-parallel replicas.
    """
    p = recipe.parallel
    return p.tensor * p.pipeline * math.lcm(p.context, p.expert)


def _roles(recipe: Recipe, target: str) -> tuple[list[dict], list[dict]]:
    layout = recipe.layout
    roles: list[dict[str, Any]] = []
    lowerings: list[dict[str, Any]] = []

    def role(layer: Layer) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "number": layer.number,
            "mtp_depth": layer.mtp_part,
            "stage": layer.stage,
            "letter": layer.letter,
            "family": layer.family,
        }
        if target == "plugin":
            entry.update(symbol=PLUGIN_SYMBOLS[layer.letter], built_by="plugin",
                         module=PLUGIN_MODULES[layer.letter], mixer=None)
            if layer.letter == "R":
                entry["slot"] = (f"carried in Megatron's {PLUGIN_R_SYMBOL!r} slot symbol; "
                                 "--megacpp-pattern names it R")
            return entry
        letter = layer.letter
        if letter == "R":
            letter = recipe.r_lowering or ""
            entry["lowered_to"] = letter
            lowerings.append({"number": layer.number, "mtp_depth": layer.mtp_part,
                              "from": "R", "to": letter, "symbol": NATIVE_SYMBOLS[letter],
                              "reason": "r_lowering (explicit in the recipe)"})
        module, mixer = NATIVE_MODULES[letter]
        entry.update(symbol=NATIVE_SYMBOLS[letter], built_by="megatron", module=module,
                     mixer=mixer)
        return entry

    for layer in (*layout.layers, *layout.mtp_layers):
        roles.append(role(layer))
    return roles, lowerings


def translate(recipe: Recipe, target: str = "native",
              command: tuple[str, ...] = ()) -> Plan:
    """The Megatron-LM flags and plan for ``recipe`` on ``target`` (native or plugin).

    Raises :class:`TranslateError` when the target cannot build the recipe faithfully.
    """
    if target not in TARGETS:
        raise TranslateError(f"unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    layout = recipe.layout
    plugin = target == "plugin"
    if plugin:
        if any(x.letter == "R" for x in layout.mtp_layers):
            raise TranslateError(
                f"{recipe.where}: cannot translate for --target plugin: R in "
                f"multi-token-prediction layers ({_numbers(layout, 'R')}) is not supported: "
                "Megatron's MTP block builds its layers by Megatron symbol. Keep R in the "
                "main pattern."
            )
        built, symbols = layout, PLUGIN_SYMBOLS
    else:
        problems = native_refusals(recipe)
        if problems:
            raise TranslateError(
                f"{recipe.where}: cannot translate for --target native:\n  - "
                + "\n  - ".join(problems)
            )
        built, symbols = recipe.lowered_layout, NATIVE_SYMBOLS
    pattern = megatron_pattern(built, symbols)
    uses = {letter for letter in FAMILIES if built.has(letter)}
    model, par, prec, train, data = (recipe.model, recipe.parallel, recipe.precision,
                                     recipe.training, recipe.data)
    f = _Flags()
    notes: list[str] = []
    omitted: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []

    def omit(key: str, reason: str) -> None:
        omitted.append({"field": key, "reason": reason})

    # ---- layout
    encoding = ", ".join(f"{k}->{v}" for k, v in symbols.items())
    f.add("--hybrid-layer-pattern", pattern, source="pattern, depth",
          reason=f"letters to Megatron symbols ({encoding}); '|' stages and '/' MTP parts kept")
    f.add("--num-layers", layout.depth, source="depth",
          reason="main-decoder layers (Megatron also derives it from the pattern)")
    if layout.mtp_depth:
        f.add("--mtp-num-layers", layout.mtp_depth, source="mtp_depths",
              reason="MTP depths (Megatron also infers them from the pattern's '/' parts)")
    if plugin:
        f.add("--spec", *SPEC, reason="the plugin's hybrid stack spec object builds every "
              "layer (Megatron imports it, does not call it)")
        f.add("--megacpp-pattern", layout.canonical, source="pattern, depth",
              reason="the exact letter of every layer, so the plugin's stack tells R from G")

    # ---- model shape
    f.add("--hidden-size", model.hidden_size, source="model.hidden_size")
    f.add("--ffn-hidden-size", model.ffn_hidden_size, source="model.ffn_hidden_size")
    f.add("--num-attention-heads", model.num_attention_heads,
          source="model.num_attention_heads")
    if model.num_query_groups is not None:
        f.add("--group-query-attention", source="model.num_query_groups")
        f.add("--num-query-groups", model.num_query_groups, source="model.num_query_groups")
    if model.kv_channels is not None:
        f.add("--kv-channels", model.kv_channels, source="model.kv_channels")
    f.add("--seq-length", model.seq_length, source="model.seq_length")
    f.add("--max-position-embeddings", model.seq_length, source="model.seq_length",
          reason="the longest position is the training sequence length")
    f.add("--position-embedding-type", model.position_embedding,
          source="model.position_embedding")
    if model.position_embedding == "rope":
        f.add("--rotary-base", model.rotary_base, source="model.rotary_base")
        if plugin:
            f.add("--no-rope-fusion", reason="the plugin's layers run unfused RoPE, as its "
                  "model builder does; Megatron's fused RoPE needs Transformer Engine, which a "
                  "local (or auto without TE) build does not have")
    else:
        omit("model.rotary_base", "position_embedding is none")
    if model.activation == "swiglu":
        f.add("--swiglu", source="model.activation")
    elif model.activation == "squared_relu":
        f.add("--squared-relu", source="model.activation")
    else:
        omit("model.activation", "gelu is Megatron's default MLP activation (no flag)")
    f.add("--normalization", model.normalization, source="model.normalization")
    f.add("--norm-epsilon", model.norm_epsilon, source="model.norm_epsilon")
    f.add("--init-method-std", model.init_std, source="model.init_std")
    if not model.tie_embeddings:
        f.add("--untie-embeddings-and-output-weights", source="model.tie_embeddings")
    f.add("--hidden-dropout", model.hidden_dropout, source="model.hidden_dropout",
          reason="explicit: Megatron's default is 0.1")
    f.add("--attention-dropout", model.attention_dropout, source="model.attention_dropout",
          reason="explicit: Megatron's default is 0.1")
    f.add("--disable-bias-linear", reason="the project's blocks have no linear biases (the "
          "model builder sets add_bias_linear=False); Megatron's default adds them")

    # ---- block families
    if "E" in uses:
        moe = model.moe
        f.add("--num-experts", moe.num_experts, source="model.moe.num_experts")
        f.add("--moe-router-topk", moe.top_k, source="model.moe.top_k")
        f.add("--moe-ffn-hidden-size", moe.ffn_hidden_size, source="model.moe.ffn_hidden_size")
        if moe.shared_expert_ffn_hidden_size is not None:
            f.add("--moe-shared-expert-intermediate-size", moe.shared_expert_ffn_hidden_size,
                  source="model.moe.shared_expert_ffn_hidden_size")
        f.add("--moe-router-load-balancing-type", moe.router_load_balancing,
              source="model.moe.router_load_balancing")
        f.add("--moe-aux-loss-coeff", moe.aux_loss_coeff, source="model.moe.aux_loss_coeff",
              reason="explicit: Megatron's default is 0.0")
        f.add("--moe-router-score-function", moe.router_score_function,
              source="model.moe.router_score_function")
        if moe.grouped_gemm:
            f.add("--moe-grouped-gemm", source="model.moe.grouped_gemm")
        f.add("--moe-token-dispatcher-type", moe.token_dispatcher,
              source="model.moe.token_dispatcher")
    else:
        omit("model.moe", "the layout has no E (MoE) layer")
    if "M" in uses:
        mamba = model.mamba
        f.add("--mamba-state-dim", mamba.state_dim, source="model.mamba.state_dim")
        f.add("--mamba-head-dim", mamba.head_dim, source="model.mamba.head_dim")
        f.add("--mamba-num-groups", mamba.num_groups, source="model.mamba.num_groups")
        if mamba.num_heads is not None:
            f.add("--mamba-num-heads", mamba.num_heads, source="model.mamba.num_heads")
        else:
            notes.append(f"model.mamba.num_heads is null: Megatron derives 2 * hidden_size / "
                         f"head_dim = {model.mamba_heads} heads, as the recipe does")
        if plugin:
            for flag, name in MAMBA_FLAGS.items():
                f.add(flag, getattr(mamba, name), source=f"model.mamba.{name}",
                      reason="Megatron has no flag for it; the plugin's Mamba-2 mixer reads it")
        else:
            for name in MAMBA_FLAGS.values():
                omit(f"model.mamba.{name}", "stock Megatron has no flag; its MambaMixer's "
                     "built-in value equals the recipe's")
    else:
        omit("model.mamba", "the layout has no M (Mamba-2) layer")
    if "R" in uses:  # plugin only: native lowers or refuses R
        for flag, name in R_FLAGS.items():
            f.add(flag, getattr(model.recurrent, name), source=f"model.recurrent.{name}")
    elif layout.has("R"):
        omit("model.recurrent", f"R is lowered to {recipe.r_lowering} (r_lowering)")
    else:
        omit("model.recurrent", "the layout has no R (recurrent) layer")
    if "G" in uses:
        gdn = model.gdn
        f.add("--linear-num-key-heads", gdn.num_key_heads, source="model.gdn.num_key_heads")
        f.add("--linear-num-value-heads", gdn.num_value_heads,
              source="model.gdn.num_value_heads")
        f.add("--linear-key-head-dim", gdn.key_head_dim, source="model.gdn.key_head_dim")
        f.add("--linear-value-head-dim", gdn.value_head_dim, source="model.gdn.value_head_dim")
        f.add("--linear-conv-kernel-dim", gdn.conv_kernel, source="model.gdn.conv_kernel")
    else:
        omit("model.gdn", "the layout has no G (Gated DeltaNet) layer")

    # ---- parallel
    f.add("--tensor-model-parallel-size", par.tensor, source="parallel.tensor")
    f.add("--pipeline-model-parallel-size", par.pipeline, source="parallel.pipeline")
    f.add("--expert-model-parallel-size", par.expert, source="parallel.expert")
    f.add("--context-parallel-size", par.context, source="parallel.context")
    if par.sequence_parallel:
        f.add("--sequence-parallel", source="parallel.sequence_parallel")
    if par.distributed_optimizer:
        f.add("--use-distributed-optimizer", source="parallel.distributed_optimizer")
    if par.fsdp == "torch_fsdp2":
        f.add("--use-torch-fsdp2", source="parallel.fsdp")
    elif par.fsdp == "megatron_fsdp":
        f.add("--use-megatron-fsdp", source="parallel.fsdp")
        f.add("--ckpt-format", "fsdp_dtensor", source="parallel.fsdp",
              reason="Megatron-FSDP requires the fsdp_dtensor checkpoint format")

    # ---- precision and backend
    if prec.params_dtype == "bf16":
        f.add("--bf16", source="precision.params_dtype")
    elif prec.params_dtype == "fp16":
        f.add("--fp16", source="precision.params_dtype")
    else:
        notes.append("precision.params_dtype fp32: Megatron's default (no --bf16/--fp16)")
    if prec.params_dtype != "fp32":
        if prec.grad_reduce_in_fp32:
            f.add("--accumulate-allreduce-grads-in-fp32", source="precision.grad_reduce_in_fp32")
        elif prec.params_dtype == "bf16":
            f.add("--grad-reduce-in-bf16", source="precision.grad_reduce_in_fp32")
        else:
            notes.append("precision.grad_reduce_in_fp32 false with fp16: Megatron reduces "
                         "fp16 gradients in fp16 by default")
    impl = "local" if recipe.backend == "local" else "transformer_engine"
    impl_reason = {
        "auto": "backend auto: " + ("the stock hybrid spec is Transformer-Engine-only"
                                    if not plugin else "Transformer Engine where it is usable; "
                                    "the plugin's dispatcher decides at build time and the "
                                    "receipt records what ran"),
        "te": "backend te",
        "local": "backend local: Megatron's local modules (plugin-built stack)",
    }[recipe.backend]
    f.add("--transformer-impl", impl, source="backend", reason=impl_reason)
    if plugin:
        f.add("--megacpp-backend", recipe.backend, source="backend",
              reason="what the recipe asked for, recorded next to what ran")
    for flag, reason in APEX_FREE_FLAGS.items():
        f.add(flag, reason=reason)
    f.add("--no-create-attention-mask-in-dataloader",
          reason="every layer is causal and its attention core applies the causal mask itself "
          "(TE and SDPA ignore a dataloader mask for causal layers); building an [s, s] mask "
          "per sample would only cost memory and time")

    # ---- schedule and optimizer
    f.add("--micro-batch-size", train.micro_batch_size, source="training.micro_batch_size")
    f.add("--global-batch-size", train.global_batch_size, source="training.global_batch_size")
    f.add("--train-iters", train.train_iters, source="training.train_iters")
    f.add("--optimizer", "adam", reason="the recipe's optimizer is Adam with decoupled weight "
          "decay (training.adam_*, training.weight_decay)")
    f.add("--lr", train.lr, source="training.lr")
    f.add("--min-lr", train.min_lr, source="training.min_lr")
    f.add("--lr-warmup-iters", train.lr_warmup_iters, source="training.lr_warmup_iters")
    f.add("--lr-decay-style", train.lr_decay_style, source="training.lr_decay_style")
    f.add("--weight-decay", train.weight_decay, source="training.weight_decay")
    f.add("--adam-beta1", train.adam_beta1, source="training.adam_beta1")
    f.add("--adam-beta2", train.adam_beta2, source="training.adam_beta2")
    f.add("--clip-grad", train.clip_grad, source="training.clip_grad")
    f.add("--seed", train.seed, source="training.seed")
    f.add("--log-interval", train.log_interval, source="training.log_interval")
    if train.save_interval is not None:
        f.add("--save-interval", train.save_interval, source="training.save_interval",
              reason="checkpoints are written only where the launcher passes --save")
    if train.eval_interval is not None:
        f.add("--eval-interval", train.eval_interval, source="training.eval_interval")
        f.add("--eval-iters", train.eval_iters, source="training.eval_iters")
    else:
        f.add("--eval-interval", train.train_iters, source="training.eval_interval",
              reason="eval_interval null (no validation): Megatron divides by eval_interval "
              "when it sizes the datasets, so it gets train_iters, and --eval-iters 0 "
              "turns validation off")
        f.add("--eval-iters", 0, source="training.eval_interval",
              reason="eval_interval null: no validation")

    # ---- data and tokenizer
    if data.source == "mock":
        f.add("--mock-data", source="data.source")
    elif data.source == "path":
        f.add("--data-path", *data.paths, source="data.paths")
    else:
        f.add("--megacpp-data", "embedded", source="data.source",
              reason="Megatron has no embedded data source: the launcher's dataset provider "
              f"({LAUNCHER}) prepares the project's own text and reads this flag")
    f.add("--split", data.split, source="data.split")
    tokenizer_source = "data.tokenizer, model.vocab_size"
    f.add("--tokenizer-type", "NullTokenizer", source="data.tokenizer",
          reason="token ids are used as they are (" + (
              "byte ids 0..255 and end-of-document" if data.tokenizer == "byte"
              else "Megatron's mock data") + ")")
    f.add("--vocab-size", model.vocab_size, source=tokenizer_source,
          reason="Megatron pads the embedding to a multiple of 128 x TP")
    if data.tokenizer == "byte":
        f.add("--null-tokenizer-eod-id", BYTE_EOD_ID, source="data.tokenizer",
              reason=f"the byte tokenizer's end-of-document id ({BYTE_EOD_ID}); "
              "NullTokenizer's default would be vocab_size - 1")

    # ---- plasticity (plugin only: native refuses it above)
    if plugin and recipe.plasticity.enabled:
        for section in PLASTICITY_SECTIONS:
            settings = getattr(recipe.plasticity, section)
            if not (settings.steps if section == "fire" else settings.every):
                continue
            for name, value in vars(settings).items():
                text = plasticity_flag_value(value)
                if text is not None and text != "":
                    f.add(plasticity_flag(section, name), text,
                          source=f"plasticity.{section}.{name}")
    elif plugin:
        omit("plasticity", "no plasticity tool is scheduled")

    # ---- logging, receipts, provenance
    if recipe.logging.tensorboard_dir is not None:
        f.add("--tensorboard-dir", recipe.logging.tensorboard_dir,
              source="logging.tensorboard_dir")
    if plugin:
        f.add("--megacpp-receipt", recipe.logging.receipt_dir.rstrip("/") + "/",
              source="logging.receipt_dir", reason="one receipt file per run in this folder")
        f.add("--megacpp-recipe", recipe.source or recipe.name, source="(the recipe file)",
              reason="provenance for the receipt; the flags are authoritative")
        f.add("--megacpp-recipe-hash", recipe.recipe_hash, source="(the resolved recipe)",
              reason="sha256 of the resolved recipe, overrides included")
    else:
        omit("logging.receipt_dir", "receipts are written by the plugin launcher "
             "(--megacpp-receipt, plugin target)")

    # ---- non-native choices, visible
    if plugin:
        notes.append(f"every layer is built by the plugin's stack spec ({' '.join(SPEC)})")
        if layout.has("R"):
            notes.append(
                f"R layers {_numbers(layout, 'R')} travel in Megatron's {PLUGIN_R_SYMBOL!r} "
                "slot symbol of --hybrid-layer-pattern; --megacpp-pattern says R"
            )
            notes.append(
                "Megatron's own FLOP and memory estimates count layers in the G slot as Gated "
                "DeltaNet (with the --linear-* sizes), so its TFLOP/s line is not exact for R; "
                "receipts use the project's own FLOP count"
            )
        if recipe.r_lowering is not None:
            notes.append(f"r_lowering ({recipe.r_lowering}) applies to the native target only; "
                         "the plugin builds R itself")
    elif layout.has("R"):
        refusals.append({
            "feature": f"R layers {_numbers(layout, 'R')}",
            "reason": "stock Megatron has no recurrent layer",
            "resolution": f"lowered explicitly to {recipe.r_lowering} (r_lowering), per layer "
                          "in lowerings: a different model than the recipe's R",
        })
    if recipe.backend == "auto" and not plugin:
        notes.append("backend auto -> transformer_engine: the stock hybrid spec is "
                     "Transformer-Engine-only")

    # ---- launch
    env: list[EnvVar] = []
    if (par.tensor > 1 or par.context > 1) and par.fsdp == "none":
        env.append(EnvVar(_ENV_MAX_CONNECTIONS, "1",
                          "Megatron-LM asserts CUDA_DEVICE_MAX_CONNECTIONS=1 with tensor or "
                          "context parallelism on GPUs before Blackwell (it keeps TP "
                          "communication ahead of compute)"))
    elif par.fsdp != "none":
        env.append(EnvVar(_ENV_MAX_CONNECTIONS, None,
                          "Megatron-LM asserts CUDA_DEVICE_MAX_CONNECTIONS is not 1 with FSDP"))
    nproc = world_size(recipe)
    world_note = (
        f"{nproc} rank(s) = TP {par.tensor} x PP {par.pipeline} x lcm(CP {par.context}, "
        f"EP {par.expert}), the smallest world the parallel sizes fit; a multiple adds "
        f"data-parallel replicas (global batch {train.global_batch_size} must divide by micro "
        f"batch {train.micro_batch_size} x data-parallel size)."
    )
    roles, lowerings = _roles(recipe, target)
    return Plan(
        recipe=recipe, target=target, megatron_pattern=pattern, flags=tuple(f.items),
        roles=tuple(roles), lowerings=tuple(lowerings), refusals=tuple(refusals),
        omitted=tuple(omitted), notes=tuple(notes), env=tuple(env), nproc=nproc,
        world_note=world_note, command=command,
    )


__all__ = [
    "LAUNCHER",
    "MEGATRON_VERSION",
    "NATIVE_MODULES",
    "PLUGIN_MODULES",
    "SPEC",
    "Flag",
    "Plan",
    "native_refusals",
    "translate",
    "world_size",
]

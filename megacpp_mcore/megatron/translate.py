"""Translate a recipe into Megatron-LM flags, with a plan that says where every flag came from.

Two targets:

``native``
    Only what stock Megatron-LM (the supported release) builds with its own
    ``hybrid_stack_spec``: the layout as ``--hybrid-layer-pattern`` (A -> ``*``, E -> ``E``,
    M -> ``M``, F -> ``-``, G -> ``G``; ``|`` stages and ``/`` MTP parts kept) and every model,
    MoE, Mamba, GDN, parallel, precision and schedule flag the recipe implies. It fails
    closed: R layers are refused unless the recipe lowers them explicitly (``r_lowering``),
    ``backend: local`` is refused (the stock hybrid spec is Transformer-Engine-only), and so
    is any setting stock Megatron cannot express.
``plugin``
    The same flags, plus ``--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec`` and the
    plugin's own flags (:mod:`megacpp_mcore.megatron.args`), so every layer, R included, is
    built by this plugin. ``--hybrid-layer-pattern`` carries R in Megatron's ``G`` slot
    symbol and ``--megacpp-plan`` gives the letter and variant of every layer, so the plugin's
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
from megacpp_mcore.plan import ModelPlan, plan_layers
from megacpp_mcore.settings.recipe import Recipe
from megacpp_mcore.settings.rules import BYTE_VOCAB_SIZE
from megacpp_mcore.settings.sizes import plugin_problems
from megacpp_mcore.settings.table import FIXED, PLUGIN_FLAG_PREFIX, RECIPE_ROWS, SETTINGS
from megacpp_mcore.supported import MEGATRON_CORE
from megacpp_mcore.symbols import (
    NATIVE_SYMBOLS,
    PLUGIN_R_SYMBOL,
    PLUGIN_SYMBOLS,
    VARIANT_SYMBOLS,
)

MEGATRON_VERSION = MEGATRON_CORE
TARGETS = ("native", "plugin")
FORMATS = ("args", "shell", "json")
#: recipe key -> the plugin flag of the recipe's top level / provenance (settings.table)
RECIPE_FLAGS: dict[str, str] = {row.key: row.flag for row in RECIPE_ROWS}
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
#: attention variant -> the mixer stock Megatron's hybrid_stack_spec builds for it.
NATIVE_ATTENTION_MIXERS: dict[str, str] = {
    "mla": "megatron.core.transformer.multi_latent_attention.MLASelfAttention",
    "dsa": "megatron.core.transformer.experimental_attention_variant.absorbed_mla."
           "AbsorbedMLASelfAttention",
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
        """A bash launch script: ``torchrun --nproc-per-node N scripts/pretrain_nam.py ...``.

        Every value is shell-quoted and every comment goes through :func:`shell_comment`, so
        no recipe string (file name, description, ``--set`` override) can end a comment line
        and start a command.
        """
        recipe = self.recipe
        comments = [
            f"Generated by: {shlex.join(self.command) if self.command else 'megacpp translate'}"
            f" (megacpp-mcore {__version__})",
            f"Recipe {recipe.name} ({recipe.where}), sha256 {recipe.recipe_hash}",
            *([f"Description: {recipe.description}"] if recipe.description else []),
            f"Target {self.target}, Megatron-Core {MEGATRON_VERSION}; pattern "
            f"{recipe.layout.canonical}",
            f"Run from the repository root. {self.world_note}",
        ]
        lines = ["#!/usr/bin/env bash", *(shell_comment(c) for c in comments),
                 "set -euo pipefail"]
        for env in self.env:
            lines.append(shell_comment(env.reason))
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


def shell_comment(text: str) -> str:
    """``text`` as one bash comment line: every character that is not printable (a newline
    would end the comment and start a command; carriage returns and escapes hide text on a
    terminal) is written as its escape sequence, so the line reads as the text and runs
    nothing."""
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
    return f"# {safe}"


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
    uses = {letter for letter in FAMILIES if recipe.lowered_layout.has(letter)}
    for row in SETTINGS:
        if not row.used_by(uses) or row.native_omits:
            continue
        plugin_flags = [flag[0] for flag in row.flags(recipe)
                        if flag[0].startswith(PLUGIN_FLAG_PREFIX)]
        if not plugin_flags:
            continue
        value = row.value(recipe)
        if row.stock is not None:
            if value != row.stock:
                problems.append(
                    f"{row.key} ({value}): stock Megatron has no flag for it (it always uses "
                    f"{row.stock}); use {row.stock}, or --target plugin")
            continue
        problems.append(
            f"{row.key} ({value!r}) needs the plugin: it travels in {', '.join(plugin_flags)}, "
            "which stock Megatron-LM does not know; use --target plugin"
            + (f"; or: {row.native_hint}" if row.native_hint else ""))
    return problems


def _unused_reason(recipe: Recipe, families: str, layout: Layout) -> str:
    letters = " or ".join(f"{x} ({FAMILIES[x]})" for x in families)
    if "R" in families and layout.has("R") and recipe.r_lowering:
        return f"R is lowered to {recipe.r_lowering} (r_lowering)"
    return f"the layout has no {letters} layer"


def world_size(recipe: Recipe) -> int:
    """The smallest world the parallel sizes fit: TP x PP x lcm(CP, EP).

    Megatron needs the world divisible by TP x PP x CP (the model-parallel block) and by
    TP x EP x PP (expert tensor parallelism defaults to TP); any multiple of this number adds
    data-parallel replicas.
    """
    p = recipe.parallel
    return p.tensor * p.pipeline * math.lcm(p.context, p.expert)


def _roles(recipe: Recipe, target: str, layer_plan: ModelPlan
           ) -> tuple[list[dict], list[dict]]:
    layout = recipe.layout
    roles: list[dict[str, Any]] = []
    lowerings: list[dict[str, Any]] = []
    planned = {(x.mtp_part, x.number): x for x in layer_plan.all_layers}

    def role(layer: Layer) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "number": layer.number,
            "mtp_depth": layer.mtp_part,
            "stage": layer.stage,
            "letter": layer.letter,
            "family": layer.family,
        }
        built = planned[(layer.mtp_part, layer.number)]  # R already lowered (native)
        variant = built.variant if built.letter == "A" else None
        if variant:
            entry["attention"] = variant
        if target == "plugin":
            entry.update(symbol=built.symbol, built_by="plugin",
                         module=PLUGIN_MODULES[layer.letter], mixer=None)
            if layer.letter == "R":
                entry["slot"] = (f"carried in Megatron's {PLUGIN_R_SYMBOL!r} slot symbol; "
                                 "--megacpp-plan names it R")
            return entry
        letter = layer.letter
        if letter == "R":
            letter = recipe.r_lowering or ""
            entry["lowered_to"] = letter
            lowerings.append({"number": layer.number, "mtp_depth": layer.mtp_part,
                              "from": "R", "to": letter, "symbol": NATIVE_SYMBOLS[letter],
                              "reason": "r_lowering (explicit in the recipe)"})
        module, mixer = NATIVE_MODULES[letter]
        if variant in NATIVE_ATTENTION_MIXERS:
            mixer = NATIVE_ATTENTION_MIXERS[variant]
        entry.update(symbol=built.symbol, built_by="megatron", module=module, mixer=mixer)
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
        problems = plugin_problems(layout, recipe.parallel)
        if problems:
            raise TranslateError(f"{recipe.where}: cannot translate for --target plugin:\n  - "
                                 + "\n  - ".join(problems))
        built, symbols = layout, PLUGIN_SYMBOLS
    else:
        problems = native_refusals(recipe)
        if problems:
            raise TranslateError(
                f"{recipe.where}: cannot translate for --target native:\n  - "
                + "\n  - ".join(problems)
            )
        built, symbols = recipe.lowered_layout, NATIVE_SYMBOLS
    attention = recipe.model.attention
    layer_plan = plan_layers(built, recipe.model, target, ranked=layout)
    pattern = layer_plan.megatron_pattern
    latent = layer_plan.latent
    uses = {letter for letter in FAMILIES if built.has(letter)}
    model, par, train, data = recipe.model, recipe.parallel, recipe.training, recipe.data
    f = _Flags()
    notes: list[str] = []
    omitted: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []

    def omit(key: str, reason: str) -> None:
        omitted.append({"field": key, "reason": reason})

    # ---- layout
    encoding = ", ".join(f"{k}->{v}" for k, v in symbols.items() if k != "A")
    encoding += ", A->" + "/".join(f"{s} ({v})" for v, s in VARIANT_SYMBOLS.items())
    f.add("--hybrid-layer-pattern", pattern, source="pattern, depth, model.attention",
          reason=f"letters to Megatron symbols ({encoding}, per A position from "
          "model.attention); '|' stages and '/' MTP parts kept")
    f.add("--num-layers", layout.depth, source="depth",
          reason="main-decoder layers (Megatron also derives it from the pattern)")
    if layout.mtp_depth:
        f.add("--mtp-num-layers", layout.mtp_depth, source="mtp_depths",
              reason="MTP depths (Megatron also infers them from the pattern's '/' parts)")
    if plugin:
        f.add("--spec", *SPEC, reason="the plugin's hybrid stack spec object builds every "
              "layer (Megatron imports it, does not call it)")
        f.add(RECIPE_FLAGS["pattern"], layer_plan.flag,
              source="pattern, depth, model.attention, model.mamba.variant",
              reason="the per-layer plan (every layer's letter and variant), carried to the "
              "--spec seam so it is never re-derived from Megatron's symbols; it tells the "
              "plugin's stack R from G")

    # ---- every setting of the table (megacpp_mcore.settings.table), in its order
    for row in SETTINGS:
        if not row.used_by(uses):
            if row.section not in {o["field"] for o in omitted}:
                omit(row.section, _unused_reason(recipe, row.families, layout))
            continue
        emitted = row.flags(recipe)
        needs_plugin = any(flag[0].startswith(PLUGIN_FLAG_PREFIX) for flag in emitted)
        if not plugin and needs_plugin:
            # native_refusals refused it unless the native run does without it
            omit(row.key, row.native_omits or "stock Megatron has no flag; its built-in "
                 "value equals the recipe's")
            continue
        for name, *values in emitted:
            f.add(name, *values, source=row.key, reason=row.reason)
    if model.mamba.num_heads is None and "M" in uses:
        notes.append(f"model.mamba.num_heads is null: Megatron derives 2 * hidden_size / "
                     f"head_dim = {model.mamba_heads} heads, as the recipe does")
    for fixed in FIXED:
        if fixed.flag and (plugin or not fixed.plugin_only_flag):
            f.add(fixed.flag, reason=fixed.reason)
    if "dsa" in latent and not plugin:
        f.add("--no-rope-fusion", source="model.attention",
              reason="Megatron asserts RoPE fusion is off for DSAttention (the seed's launcher "
              "passes it too)")
    if "dsa" in latent and plugin and attention.dsa.rotate_activation:
        notes.append("model.attention.dsa.rotate_activation true: the indexer's Hadamard "
                     "rotation needs fast_hadamard_transform; where it is missing the plugin "
                     "launcher builds DSA without it and the backend record says DEVIATION")

    # ---- backend
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
        f.add(RECIPE_FLAGS["backend"], recipe.backend, source="backend",
              reason="what the recipe asked for, recorded next to what ran")
    f.add("--no-create-attention-mask-in-dataloader",
          reason="every layer is causal and its attention core applies the causal mask itself "
          "(TE and SDPA ignore a dataloader mask for causal layers); building an [s, s] mask "
          "per sample would only cost memory and time")

    # ---- optimizer
    f.add("--optimizer", "adam", reason="the recipe's optimizer is Adam with decoupled weight "
          "decay (training.adam_*, training.weight_decay)")

    # ---- tokenizer (data.source, data.paths and data.split are table rows)
    f.add("--tokenizer-type", "NullTokenizer", source="data.tokenizer",
          reason="token ids are used as they are (" + (
              "byte ids 0..255 and end-of-document" if data.tokenizer == "byte"
              else "Megatron's mock data") + ")")
    if data.tokenizer == "byte":
        f.add("--null-tokenizer-eod-id", BYTE_EOD_ID, source="data.tokenizer",
              reason=f"the byte tokenizer's end-of-document id ({BYTE_EOD_ID}); "
              "NullTokenizer's default would be vocab_size - 1")

    # ---- provenance
    if plugin:
        f.add(RECIPE_FLAGS["source"], recipe.source or recipe.name, source="(the recipe file)",
              reason="provenance for the receipt; the flags are authoritative")
        f.add(RECIPE_FLAGS["recipe_hash"], recipe.recipe_hash, source="(the resolved recipe)",
              reason="sha256 of the resolved recipe, overrides included")

    # ---- non-native choices, visible
    if plugin:
        notes.append(f"every layer is built by the plugin's stack spec ({' '.join(SPEC)})")
        if layout.has("R"):
            notes.append(
                f"R layers {_numbers(layout, 'R')} travel in Megatron's {PLUGIN_R_SYMBOL!r} "
                "slot symbol of --hybrid-layer-pattern; --megacpp-plan says R"
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
    roles, lowerings = _roles(recipe, target, layer_plan)
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
    "shell_comment",
    "translate",
    "world_size",
]

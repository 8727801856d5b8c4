"""The one map between this project's block letters and Megatron's hybrid-pattern notation.

Both directions live here: a layer's letter and variant -> its Megatron symbol and the slot of
Megatron's ``HybridStackSubmodules`` that holds its spec (:func:`symbol_for`, :data:`SLOTS`),
and a Megatron symbol -> the letter and variant it stands for (:func:`decode_symbol`).

Stock Megatron builds A, E, M, F and G itself (``*``/``+``/``D`` for the attention variants,
``E``, ``M``, ``-``, ``G``). R has no Megatron symbol: the plugin's stack carries R layers in
Megatron's ``G`` slot symbol, and the per-layer plan (:mod:`megacpp_mcore.plan`, carried in
``--megacpp-plan``) gives the exact letter of every layer, so an R is never taken for a G or
the other way round. Megatron's own logs and FLOP estimate (``num_floating_point_operations``)
therefore call R layers GDN; the plugin's receipts count them from the plan. Pure Python.
"""

from __future__ import annotations

from megacpp_mcore.errors import SpecError

#: letters stock Megatron builds, with their hybrid-pattern symbol (A: its GQA symbol).
NATIVE_SYMBOLS: dict[str, str] = {"A": "*", "E": "E", "M": "M", "F": "-", "G": "G"}
#: the Megatron symbol the plugin uses to carry an R layer through HybridModel.
PLUGIN_R_SYMBOL = "G"
#: letter -> symbol as the plugin's stack expects it in ``--hybrid-layer-pattern``.
PLUGIN_SYMBOLS: dict[str, str] = {**NATIVE_SYMBOLS, "R": PLUGIN_R_SYMBOL}
#: attention variant of an A position -> its Megatron symbol (GQA, MLA, DSA).
VARIANT_SYMBOLS: dict[str, str] = {"gqa": "*", "mla": "+", "dsa": "D"}
#: every Megatron symbol an A position may carry.
ATTENTION_SYMBOLS = frozenset(VARIANT_SYMBOLS.values())
#: the stack slot (a field of Megatron's HybridStackSubmodules, plus the plugin's R slot)
#: holding each letter's layer spec; A's slot depends on its variant (ATTENTION_SLOTS).
SLOTS: dict[str, str] = {
    "E": "moe_layer",
    "M": "mamba_layer",
    "F": "mlp_layer",
    "R": "recurrent_layer",
    "G": "gdn_layer",
}
#: attention variant -> the stack slot holding its layer spec.
ATTENTION_SLOTS: dict[str, str] = {"gqa": "attention_layer", "mla": "mla_layer",
                                   "dsa": "dsa_layer"}
TARGETS = ("plugin", "native")


def symbol_for(letter: str, variant: str | None = None, target: str = "plugin") -> str:
    """The Megatron symbol of a layer: ``letter`` (``variant`` for A) on ``target``."""
    if letter == "A":
        return VARIANT_SYMBOLS[variant or "gqa"]
    symbols = PLUGIN_SYMBOLS if target == "plugin" else NATIVE_SYMBOLS
    if letter not in symbols:
        raise SpecError(f"letter {letter!r} has no Megatron symbol on the {target} target "
                        f"(accepted: {', '.join(symbols)})")
    return symbols[letter]


def slot_for(letter: str, variant: str | None = None) -> str:
    """The stack slot whose spec builds a layer of ``letter`` (``variant`` for A)."""
    return ATTENTION_SLOTS[variant or "gqa"] if letter == "A" else SLOTS[letter]


def decode_symbol(symbol: str) -> tuple[str, str | None]:
    """``(letter, attention variant or None)`` of a stock Megatron symbol. ``G`` decodes to G:
    on the plugin target it may also carry R, which only the plan can tell."""
    for variant, s in VARIANT_SYMBOLS.items():
        if s == symbol:
            return "A", variant
    for letter, s in NATIVE_SYMBOLS.items():
        if s == symbol:
            return letter, None
    raise SpecError(f"Megatron symbol {symbol!r} is not built by this project (accepted: "
                    f"{', '.join([*VARIANT_SYMBOLS.values(), *NATIVE_SYMBOLS.values()][1:])})")


__all__ = ["ATTENTION_SLOTS", "ATTENTION_SYMBOLS", "NATIVE_SYMBOLS", "PLUGIN_R_SYMBOL",
           "PLUGIN_SYMBOLS", "SLOTS", "TARGETS", "VARIANT_SYMBOLS", "decode_symbol",
           "slot_for", "symbol_for"]

"""How this project's block letters are written in Megatron's hybrid-pattern notation.

Stock Megatron builds A, E, M, F and G itself (``*``, ``E``, ``M``, ``-``, ``G``). R has no
Megatron symbol: the plugin's stack carries R layers in Megatron's ``G`` slot symbol and reads
the exact letter of every layer from the layout (``--megacpp-pattern``), so an R is never
taken for a G or the other way round. Pure Python.
"""

from __future__ import annotations

from megacpp_mcore.layout import MTP_SEPARATOR, STAGE_SEPARATOR, Layout

#: letters stock Megatron builds, with their hybrid-pattern symbol.
NATIVE_SYMBOLS: dict[str, str] = {"A": "*", "E": "E", "M": "M", "F": "-", "G": "G"}
#: the Megatron symbol the plugin uses to carry an R layer through HybridModel.
PLUGIN_R_SYMBOL = "G"
#: letter -> symbol as the plugin's stack expects it in ``--hybrid-layer-pattern``.
PLUGIN_SYMBOLS: dict[str, str] = {**NATIVE_SYMBOLS, "R": PLUGIN_R_SYMBOL}
#: attention variant of an A position -> its Megatron symbol (GQA, MLA, DSA).
VARIANT_SYMBOLS: dict[str, str] = {"gqa": "*", "mla": "+", "dsa": "D"}
#: every Megatron symbol an A position may carry.
ATTENTION_SYMBOLS = frozenset(VARIANT_SYMBOLS.values())


def megatron_pattern(layout: Layout, symbols: dict[str, str],
                     variants: dict[int, str] | None = None, mtp_variant: str = "gqa") -> str:
    """The layout in Megatron notation (stages joined by '|', MTP parts after '/').

    ``variants`` maps main-decoder A layer numbers to their attention variant (see
    ``settings.attention.a_variants``) and ``mtp_variant`` names the variant of A layers in
    MTP parts; without them every A is ``*``.
    """
    variants = variants or {}

    def symbol(letter: str, number: int | None) -> str:
        if letter != "A":
            return symbols[letter]
        variant = variants.get(number, "gqa") if number is not None else mtp_variant
        return VARIANT_SYMBOLS[variant]

    stages: list[str] = []
    for layer in layout.layers:
        while len(stages) <= layer.stage:
            stages.append("")
        stages[layer.stage] += symbol(layer.letter, layer.number)
    mtp = ["".join(symbol(letter, None) for letter in part) for part in layout.mtp]
    return MTP_SEPARATOR.join([STAGE_SEPARATOR.join(stages), *mtp])

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


def megatron_pattern(layout: Layout, symbols: dict[str, str]) -> str:
    """The layout in Megatron notation (stages joined by '|', MTP parts after '/')."""

    def encode(letters: str) -> str:
        return "".join(symbols[letter] for letter in letters)

    main = STAGE_SEPARATOR.join(encode(stage) for stage in layout.stages)
    return MTP_SEPARATOR.join([main, *(encode(part) for part in layout.mtp)])

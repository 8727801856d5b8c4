"""The per-layer plan: every layer's letter, family variant, Megatron symbol and stack slot.

A layout says which family each layer is (``AEMFRA``); the recipe says which variant each
family takes (GQA/MLA/DSA per A position, Mamba-2 or Mamba-3 for M). :func:`plan_layers`
resolves the two once into a :class:`ModelPlan`, and everything downstream reads that plan:
the model builder and the stack spec (which slot builds each layer), translation (the
``--hybrid-layer-pattern`` symbols and ``--megacpp-plan``), the ``--spec`` seam (which parses
the plan back from ``--megacpp-plan`` instead of re-deriving it from symbols), FLOP counts,
the backend dispatcher and receipts. Nothing downstream re-derives a variant from Megatron
symbols or from the settings. The backend's paths (fused or reference scan, the token
dispatcher) are a machine's decision; :meth:`ModelPlan.with_paths` adds them once the backend
is resolved. Letters <-> symbols are :mod:`megacpp_mcore.symbols`. Pure Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from megacpp_mcore.errors import PatternError, SpecError
from megacpp_mcore.layout import FAMILIES, MTP_SEPARATOR, STAGE_SEPARATOR, Layout, parse_pattern
from megacpp_mcore.settings.attention import a_variants, mtp_variant
from megacpp_mcore.symbols import TARGETS, VARIANT_SYMBOLS, slot_for, symbol_for

#: letter -> the variants a layer of it may take (letters absent here have none).
LETTER_VARIANTS: dict[str, tuple[str, ...]] = {
    "A": tuple(VARIANT_SYMBOLS),
    "M": ("mamba2", "mamba3"),
    "R": ("m2rnn",),
}
#: multi-latent attention variants (Megatron builds them with one MLATransformerConfig).
LATENT = ("mla", "dsa")


@dataclass(frozen=True)
class LayerPlan:
    """One layer as it is built.

    ``number`` is Megatron's 1-based layer number in the main decoder, or the 1-based
    position inside its multi-token-prediction part (``mtp_part`` >= 1). ``variant`` is the
    family's variant (A: gqa/mla/dsa, M: mamba2/mamba3, R: m2rnn; None for E, F, G).
    ``symbol`` is its Megatron hybrid-pattern symbol and ``slot`` the stack slot whose spec
    builds it. ``path`` is the backend's path for its family once resolved (None before).
    """

    number: int
    letter: str
    variant: str | None
    symbol: str
    slot: str
    stage: int = 0
    mtp_part: int = 0
    path: str | None = None

    @property
    def token(self) -> str:
        """This layer in ``--megacpp-plan``: the letter, then ``:variant`` if it has one."""
        return f"{self.letter}:{self.variant}" if self.variant else self.letter

    def record(self) -> dict[str, Any]:
        return {"number": self.number, "mtp_part": self.mtp_part, "stage": self.stage,
                "letter": self.letter, "variant": self.variant, "symbol": self.symbol,
                "slot": self.slot, "path": self.path}


@dataclass(frozen=True)
class ModelPlan:
    """Every layer of a layout, resolved: the main decoder, then the MTP parts."""

    layout: Layout
    layers: tuple[LayerPlan, ...]
    mtp_layers: tuple[LayerPlan, ...] = ()
    target: str = "plugin"

    @property
    def all_layers(self) -> tuple[LayerPlan, ...]:
        return (*self.layers, *self.mtp_layers)

    def variants(self, letter: str) -> set[str]:
        """The variants the layers of ``letter`` use (main decoder and MTP parts)."""
        return {x.variant for x in self.all_layers if x.letter == letter and x.variant}

    @property
    def latent(self) -> set[str]:
        """The multi-latent attention variants (mla, dsa) the model builds."""
        return self.variants("A") & set(LATENT)

    def variant_of(self, number: int) -> str | None:
        """The variant of main-decoder layer ``number``."""
        return self.layers[number - 1].variant

    @property
    def megatron_pattern(self) -> str:
        """``--hybrid-layer-pattern``: the symbols, stages joined by '|', MTP parts after '/'."""
        return self._joined(lambda layer: layer.symbol, "")

    @property
    def flag(self) -> str:
        """``--megacpp-plan``: one token per layer (``A:dsa E M:mamba2 ... | ... / A:mla E``)."""
        return self._joined(lambda layer: layer.token, " ")

    def _joined(self, show, sep: str) -> str:
        stages: list[list[str]] = []
        for layer in self.layers:
            while len(stages) <= layer.stage:
                stages.append([])
            stages[layer.stage].append(show(layer))
        parts: dict[int, list[str]] = {}
        for layer in self.mtp_layers:
            parts.setdefault(layer.mtp_part, []).append(show(layer))
        main = f"{sep}{STAGE_SEPARATOR}{sep}".join(sep.join(s) for s in stages)
        return f"{sep}{MTP_SEPARATOR}{sep}".join(
            [main, *(sep.join(parts[k]) for k in sorted(parts))])

    def with_paths(self, paths: Mapping[str, str | None]) -> ModelPlan:
        """The plan with each family's backend path (``{letter: path}``) filled in."""
        def fill(layers):
            return tuple(replace(x, path=paths.get(x.letter)) for x in layers)
        return replace(self, layers=fill(self.layers), mtp_layers=fill(self.mtp_layers))

    def without_stages(self) -> ModelPlan:
        """The same layers with every '|' stage mark dropped (one rank builds them all)."""
        layers = tuple(replace(x, stage=0) for x in self.layers)
        mtp = tuple(replace(x, stage=0) for x in self.mtp_layers)
        return replace(self, layout=parse_pattern(
            self.layout.canonical.replace(STAGE_SEPARATOR, "")), layers=layers, mtp_layers=mtp)

    def record(self) -> list[dict[str, Any]]:
        """JSON-ready, one entry per layer (main decoder, then MTP parts), for receipts."""
        return [layer.record() for layer in self.all_layers]


def _variant(letter: str, model: Any, a_variant: str | None) -> str | None:
    if letter == "A":
        return a_variant or "gqa"
    if letter == "M":
        return model.mamba.variant if model is not None else "mamba2"
    if letter == "R":
        return "m2rnn"
    return None


def _layer(number: int, letter: str, variant: str | None, stage: int, mtp_part: int,
           target: str) -> LayerPlan:
    return LayerPlan(number=number, letter=letter, variant=variant,
                     symbol=symbol_for(letter, variant, target), slot=slot_for(letter, variant),
                     stage=stage, mtp_part=mtp_part)


def plan_layers(layout: Layout, model: Any = None, target: str = "plugin",
                ranked: Layout | None = None) -> ModelPlan:
    """Resolve ``layout`` with the model settings ``model`` (a ``ModelConfig``; None: every
    A is gqa and every M mamba2) into the per-layer plan for ``target`` (plugin or native).

    ``ranked`` is the layout whose A ranks the settings refer to, when ``layout`` is the
    recipe's layout with R lowered to another letter (the native target's ``r_lowering``).
    """
    if target not in TARGETS:
        raise SpecError(f"unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    attention = model.attention if model is not None else None
    by_number = a_variants(layout, attention, ranked) if attention is not None else {}
    mtp_a = mtp_variant(attention) if attention is not None else "gqa"
    layers = tuple(_layer(x.number, x.letter, _variant(x.letter, model, by_number.get(x.number)),
                          x.stage, 0, target) for x in layout.layers)
    mtp = tuple(_layer(x.number, x.letter, _variant(x.letter, model, mtp_a), x.stage,
                       x.mtp_part, target) for x in layout.mtp_layers)
    return ModelPlan(layout=layout, layers=layers, mtp_layers=mtp, target=target)


def parse_plan(text: str, target: str = "plugin") -> ModelPlan:
    """The plan written by :attr:`ModelPlan.flag` (``--megacpp-plan``), checked token by
    token: each letter must be a family's and each variant one of its letter's."""
    letters: list[str] = []
    variants: list[str | None] = []
    for position, token in enumerate(text.split(), start=1):
        if token in (STAGE_SEPARATOR, MTP_SEPARATOR):
            letters.append(token)
            continue
        letter, _, variant = token.partition(":")
        accepted = LETTER_VARIANTS.get(letter, ())
        if letter not in FAMILIES or (variant and variant not in accepted) or (
                accepted and not variant):
            raise SpecError(
                f"--megacpp-plan token {position} {token!r}: expected a block letter with its "
                "variant (A:gqa, A:mla, A:dsa, M:mamba2, M:mamba3, R:m2rnn) or a plain E, F "
                f"or G, and '{STAGE_SEPARATOR}' / '{MTP_SEPARATOR}' between stages and parts")
        letters.append(letter)
        variants.append(variant or None)
    try:
        layout = parse_pattern("".join(letters))
    except PatternError as err:
        raise SpecError(f"--megacpp-plan {text!r}: {err}") from None
    chosen = iter(variants)
    layers = tuple(_layer(x.number, x.letter, next(chosen), x.stage, 0, target)
                   for x in layout.layers)
    mtp = tuple(_layer(x.number, x.letter, next(chosen), x.stage, x.mtp_part, target)
                for x in layout.mtp_layers)
    parts = {k: [x.token for x in mtp if x.mtp_part == k] for k in range(1, layout.mtp_depth + 1)}
    if any(tokens != parts[1] for tokens in parts.values()):
        raise SpecError(f"--megacpp-plan {text!r}: the multi-token-prediction parts differ "
                        f"({' / '.join(' '.join(t) for t in parts.values())}); Megatron builds "
                        "every MTP depth from one part, so they must be identical")
    return ModelPlan(layout=layout, layers=layers, mtp_layers=mtp, target=target)


__all__ = ["LATENT", "LETTER_VARIANTS", "LayerPlan", "ModelPlan", "parse_plan", "plan_layers"]

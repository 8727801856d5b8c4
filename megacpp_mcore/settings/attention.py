"""Per-position attention variants: which A layer is GQA, MLA or DSA (pure Python).

The recipe names variants by A rank (0-based among the main decoder's A layers, as the seed
system does) or by layer number; everything downstream (translation, the plugin's stack,
FLOP counts) asks :func:`a_variants` for one variant per A layer, so the two spellings never
disagree. :func:`attention_problems` says what a recipe got wrong, naming the positions.
"""

from __future__ import annotations

from megacpp_mcore.layout import Layout
from megacpp_mcore.settings.config import AttentionConfig

VARIANTS = ("gqa", "mla", "dsa")
#: variants built by Megatron's multi-latent attention (one MLATransformerConfig per model).
LATENT = ("mla", "dsa")


def _listed(attention: AttentionConfig, layout: Layout) -> dict[int, list[tuple[str, str]]]:
    """layer number -> [(variant, the setting that lists it)] for every listed position that
    exists (problems with the others are reported by attention_problems)."""
    a_layers = layout.positions("A")
    listed: dict[int, list[tuple[str, str]]] = {}
    for variant in LATENT:
        for rank in getattr(attention, f"{variant}_ranks"):
            if 0 <= rank < len(a_layers):
                listed.setdefault(a_layers[rank], []).append(
                    (variant, f"model.attention.{variant}_ranks ({rank})"))
        for number in getattr(attention, f"{variant}_layers"):
            if number in a_layers:
                listed.setdefault(number, []).append(
                    (variant, f"model.attention.{variant}_layers ({number})"))
    return listed


def a_variants(layout: Layout, attention: AttentionConfig,
               ranked: Layout | None = None) -> dict[int, str]:
    """Main-decoder layer number -> variant, for every A of ``layout``.

    ``ranked`` is the layout whose A ranks the settings refer to (the recipe's own layout
    when ``layout`` is its R-lowered form); A layers that exist only in ``layout`` get
    ``attention.variant``.
    """
    listed = _listed(attention, ranked or layout)
    return {n: listed[n][0][0] if n in listed else attention.variant
            for n in layout.positions("A")}


def mtp_variant(attention: AttentionConfig) -> str:
    """The variant of A layers in multi-token-prediction parts."""
    return attention.mtp_variant or attention.variant


def used_variants(layout: Layout, attention: AttentionConfig,
                  ranked: Layout | None = None) -> set[str]:
    """Every variant the layout's A layers (main and MTP) use."""
    used = set(a_variants(layout, attention, ranked).values())
    if any(x.letter == "A" for x in layout.mtp_layers):
        used.add(mtp_variant(attention))
    return used


def attention_problems(layout: Layout, attention: AttentionConfig) -> list[str]:
    """What is wrong with the per-position variants for ``layout`` (empty if nothing)."""
    problems: list[str] = []
    a_layers = layout.positions("A")
    for variant in LATENT:
        key = f"model.attention.{variant}_ranks"
        ranks = getattr(attention, f"{variant}_ranks")
        missing = [r for r in ranks if not 0 <= r < len(a_layers)]
        if missing:
            problems.append(
                f"{key} lists A ranks {missing} that do not exist: the layout "
                f"{layout.canonical!r} has {len(a_layers)} A layer(s) in its main decoder "
                f"(ranks 0..{len(a_layers) - 1} = layers {list(a_layers)})")
        key = f"model.attention.{variant}_layers"
        layers = getattr(attention, f"{variant}_layers")
        not_a = [n for n in layers if n not in a_layers]
        if not_a:
            letters = [layout.letters[n - 1] if 1 <= n <= layout.depth else "none"
                       for n in not_a]
            problems.append(
                f"{key} lists layers {not_a} that are not A layers (they are "
                f"{letters}); the main decoder's A layers are {list(a_layers)}")
        for name, values in ((f"{variant}_ranks", ranks), (f"{variant}_layers", layers)):
            dupes = sorted({v for v in values if list(values).count(v) > 1})
            if dupes:
                problems.append(f"model.attention.{name} lists {dupes} more than once")
    for number, claims in _listed(attention, layout).items():
        if len({variant for variant, _ in claims}) > 1:
            problems.append(f"layer {number} (an A) is given two variants: "
                            + " and ".join(f"{v} by {where}" for v, where in claims))
    used = used_variants(layout, attention)
    if "gqa" in used and used & set(LATENT):
        gqa = [n for n, v in a_variants(layout, attention).items() if v == "gqa"]
        problems.append(
            f"attention variants mix gqa (layers {gqa}"
            + (", MTP" if mtp_variant(attention) == "gqa" and layout.mtp else "")
            + f") with {sorted(used & set(LATENT))}: Megatron-Core builds one attention "
            "config per model and refuses '*' with '+'/'D' in one pattern; give every A "
            "position mla or dsa (model.attention.variant), or list none")
    return problems


__all__ = ["LATENT", "VARIANTS", "a_variants", "attention_problems", "mtp_variant",
           "used_variants"]

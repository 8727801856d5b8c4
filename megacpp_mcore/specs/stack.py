"""The hybrid stack: for every position of a layout, the layer of its family.

``MegacppHybridStack`` is a thin subclass of Megatron's ``HybridStack``: it keeps Megatron's
forward, pipeline hand-off and checkpoint sharding, and changes only construction, because
upstream (a) has no slot for R and (b) always builds its final norm with Transformer Engine.
Here each layer is built from the exact letter of the layout (checked against the symbol
HybridModel passes, so nothing is remapped) and the final norm follows the backend.

``build_stack_spec(layout, model, plan)`` gives a ``ModuleSpec`` to pass to
``HybridModel(..., hybrid_stack_spec=...)`` with the pattern from
``symbols.megatron_pattern(layout, PLUGIN_SYMBOLS)``. Megatron's ``--spec`` seam
(``megacpp_mcore.megatron.spec_seam megacpp_stack_spec``) resolves to it from Megatron's args.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megacpp_mcore.backend import BackendPlan
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layout import Layout
from megacpp_mcore.settings.attention import used_variants
from megacpp_mcore.settings.config import ModelConfig
from megacpp_mcore.specs.attention import VARIANT_SLOTS, attention_layer_spec
from megacpp_mcore.specs.gdn import gdn_layer_spec
from megacpp_mcore.specs.mamba import mamba_layer_spec
from megacpp_mcore.specs.mlp import mlp_layer_spec
from megacpp_mcore.specs.moe import moe_layer_spec
from megacpp_mcore.specs.providers import provider_for
from megacpp_mcore.specs.recurrent import recurrent_layer_spec
from megacpp_mcore.symbols import ATTENTION_SYMBOLS, PLUGIN_SYMBOLS, VARIANT_SYMBOLS


@dataclass
class MegacppStackSubmodules(HybridStackSubmodules):
    """Megatron's stack slots plus the plugin's R slot and a backend-specific final norm.

    The inherited slots keep Megatron's meaning, so Megatron's MTP block (which builds a
    plain HybridStack from these submodules) stays correct for A, E, M, F and G.
    """

    recurrent_layer: ModuleSpec | type = IdentityOp
    final_norm: Any = LocalNorm


#: letter -> the stack slot holding its layer spec
_SLOTS = {
    "A": "attention_layer",
    "E": "moe_layer",
    "M": "mamba_layer",
    "F": "mlp_layer",
    "R": "recurrent_layer",
    "G": "gdn_layer",
}


class MegacppHybridStack(HybridStack):
    """Megatron's HybridStack, built from the layout's letters (R included)."""

    def __init__(
        self,
        config,
        submodules: MegacppStackSubmodules,
        pre_process: bool = True,
        layer_type_list: list[str] | None = None,
        pp_layer_offset: int = 0,
        post_layer_norm: bool = True,
        post_process: bool = True,
        device=None,
        dtype=None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        layout_letters: str,
        backend_record: dict | None = None,
    ) -> None:
        # HybridStack.__init__ would build every layer by Megatron symbol and a TE final
        # norm; initialise the module base directly and set the same attributes it sets.
        MegatronModule.__init__(self, config=config)
        if pg_collection is None or layer_type_list is None:
            raise SpecError("MegacppHybridStack is built by HybridModel, which passes "
                            "pg_collection and layer_type_list")
        self.pre_process = pre_process
        self.post_layer_norm = post_layer_norm
        self.post_process = post_process
        self.is_mtp_layer = is_mtp_layer
        self.pp_group = pg_collection.pp
        self.tp_group = pg_collection.tp
        self.input_tensor = None
        self.pg_collection = pg_collection
        self.layer_type_list = layer_type_list
        self.backend_record = backend_record or {}

        letters = layout_letters[pp_layer_offset : pp_layer_offset + len(layer_type_list)]
        if len(letters) != len(layer_type_list):
            raise SpecError(f"the layout has {len(layout_letters)} layers but this pipeline "
                            f"segment asks for layers {pp_layer_offset + 1}.."
                            f"{pp_layer_offset + len(layer_type_list)}")
        self.layer_letters = letters
        self.layers = _build_layers(config, submodules, letters, layer_type_list,
                                    pp_layer_offset, pg_collection, is_mtp_layer, name)
        self.num_layers_per_pipeline_rank = len(self.layers)
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=config,
                                           hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)


def _build_layers(config, submodules, letters, symbols, offset, pg_collection, is_mtp, name):
    import torch

    layers = torch.nn.ModuleList()
    for i, (letter, symbol) in enumerate(zip(letters, symbols, strict=True)):
        number = offset + i + 1
        slot = _SLOTS[letter]
        if letter == "A" and symbol in ATTENTION_SYMBOLS:  # the variant travels as the symbol
            slot = VARIANT_SLOTS[next(v for v, s in VARIANT_SYMBOLS.items() if s == symbol)]
        elif PLUGIN_SYMBOLS[letter] != symbol:
            raise SpecError(
                f"layer {number}: the layout says {letter!r} (Megatron symbol "
                f"{PLUGIN_SYMBOLS[letter]!r}) but HybridModel's pattern has {symbol!r}; the "
                "--hybrid-layer-pattern and the plugin's layout disagree")
        kwargs: dict[str, Any] = {
            "config": config,
            "layer_number": number,
            "pg_collection": pg_collection,
            "name": f"{name}.layers.{i}" if name is not None else None,
        }
        if letter in ("M", "R"):
            kwargs["pp_layer_offset"] = offset
        else:
            kwargs["add_layer_offset"] = False
        if letter == "A":
            kwargs.update(is_mtp_layer=is_mtp, pp_layer_offset=offset)
        layers.append(build_module(getattr(submodules, slot), **kwargs))
    return layers


# --------------------------------------------------------------------------- builders


def _mtp_block_spec(provider: BackendSpecProvider) -> ModuleSpec:
    """Megatron's MTP block (norms + projection) with the provider's modules (with TE's,
    stock Megatron's hybrid MTP block)."""
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlock,
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )

    norm = provider.layer_norm()
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=norm, hnorm=norm, eh_proj=provider.column_parallel_linear(),
            mtp_model_layer=None, layer_norm=norm,
        ),
    )
    return ModuleSpec(module=MultiTokenPredictionBlock,
                      submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[layer]))


def build_stack_submodules(layout: Layout, model: ModelConfig,
                           plan: BackendPlan) -> MegacppStackSubmodules:
    """Layer specs for every family ``layout`` uses (others stay empty)."""
    provider = provider_for(plan.built)
    if any(layer.letter == "R" for layer in layout.mtp_layers):
        raise SpecError(
            "R in multi-token-prediction layers is not supported: Megatron's MTP block builds "
            "its layers by Megatron symbol, and R has none. Keep R in the main pattern.")
    sub = MegacppStackSubmodules()
    if layout.has("A"):
        for variant in used_variants(layout, model.attention):
            setattr(sub, VARIANT_SLOTS[variant], attention_layer_spec(provider, variant))
    if layout.has("E"):
        sub.moe_layer = moe_layer_spec(provider, model.moe)
    if layout.has("M"):
        sub.mamba_layer = mamba_layer_spec(provider, plan.path("M"), model.mamba)
    if layout.has("F"):
        sub.mlp_layer = mlp_layer_spec(provider)
    if layout.has("R"):
        sub.recurrent_layer = recurrent_layer_spec(provider, plan.path("R"), model.recurrent)
    if layout.has("G"):
        sub.gdn_layer = gdn_layer_spec(provider)
    if layout.mtp:
        sub.mtp_block_spec = _mtp_block_spec(provider)
    sub.final_norm = provider.layer_norm()
    return sub


def build_stack_spec(layout: Layout, model: ModelConfig, plan: BackendPlan) -> ModuleSpec:
    """The stack spec for ``layout``: pass it to HybridModel with
    ``hybrid_layer_pattern=megatron_pattern(layout, PLUGIN_SYMBOLS)``."""
    return ModuleSpec(
        module=MegacppHybridStack,
        params={"layout_letters": layout.letters, "backend_record": plan.record()},
        submodules=build_stack_submodules(layout, model, plan),
    )

__all__ = [
    "MegacppHybridStack",
    "MegacppStackSubmodules",
    "build_stack_spec",
    "build_stack_submodules",
]

"""The hybrid stack: for every position of a layout, the layer of its family.

``MegacppHybridStack`` is a thin subclass of Megatron's ``HybridStack``: it keeps Megatron's
forward, pipeline hand-off and checkpoint sharding, and changes only construction, because
upstream (a) has no slot for R and (b) always builds its final norm with Transformer Engine.
Here each layer is built from the slot its per-layer plan names (:mod:`megacpp_mcore.plan`;
the plan's symbol is checked against the one HybridModel passes, so nothing is remapped) and
the final norm follows the backend.

``build_stack_spec(layer_plan, model, plan)`` gives a ``ModuleSpec`` to pass to
``HybridModel(..., hybrid_stack_spec=...)`` with ``layer_plan.megatron_pattern``. Megatron's
``--spec`` seam (``megacpp_mcore.megatron.spec_seam``) builds it from Megatron's parsed args.
What upstream's ``HybridStack.__init__`` does besides picking layers (in the supported
megatron-core, ``supported.MEGATRON_CORE``; ``tests/test_specs.py`` pins its source, and
``_fuse_mla_down_proj``'s, by hash so that an upgrade asks for this list to be re-checked), and
what this constructor decided for each:

- FP8/FP4 quantised init: ported. Each layer is built inside
  ``get_fp8_context(config, i + pp_layer_offset, is_init=True)`` when ``config.fp8`` (else
  ``get_fp4_context(...)`` when ``config.fp4``), as upstream; the final norm outside it.
- ``cuda_graph_impl="local"``: ported. ``annotate_first_last_layer(self.layers)`` once the
  layers are built, as upstream.
- ``mla_down_proj_fusion``: ported on the te backend, where the inherited
  ``_fuse_mla_down_proj`` turns the MLA slot into ``FusedMLASelfAttention`` with one TE
  LayerNormColumnParallelLinear for the input norm and the q/kv down projections. Refused
  with a ``SpecError`` on the local backend (its MLA is a torch norm and column-parallel
  down projections, which have no fused form) and where the model has no MLA layer
  (upstream fuses only the MLA slot and would fail on an empty one).
- The final norm follows the backend (the spec's ``final_norm``) where upstream always
  builds TE's; the forward, pipeline hand-off and checkpoint sharding are upstream's.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from megatron.core.fp4_utils import get_fp4_context
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.cuda_graphs import annotate_first_last_layer
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megacpp_mcore.backend import BackendPlan
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layout import Layout
from megacpp_mcore.plan import ModelPlan, parse_plan, plan_layers
from megacpp_mcore.settings.config import ModelConfig
from megacpp_mcore.specs.attention import attention_layer_spec
from megacpp_mcore.specs.gdn import gdn_layer_spec
from megacpp_mcore.specs.mamba import mamba_layer_spec
from megacpp_mcore.specs.mlp import mlp_layer_spec
from megacpp_mcore.specs.moe import moe_layer_spec
from megacpp_mcore.specs.providers import provider_for
from megacpp_mcore.specs.recurrent import recurrent_layer_spec
from megacpp_mcore.symbols import ATTENTION_SLOTS


@dataclass
class MegacppStackSubmodules(HybridStackSubmodules):
    """Megatron's stack slots plus the plugin's R slot and a backend-specific final norm.

    The inherited slots keep Megatron's meaning, so Megatron's MTP block (which builds a
    plain HybridStack from these submodules) stays correct for A, E, M, F and G.
    """

    recurrent_layer: ModuleSpec | type = IdentityOp
    final_norm: Any = LocalNorm


class MegacppHybridStack(HybridStack):
    """Megatron's HybridStack, each layer built from its per-layer plan (R included)."""

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
        layer_plan: str,
        backend_record: dict | None = None,
    ) -> None:
        # HybridStack.__init__ would build every layer by Megatron symbol and a TE final
        # norm; initialise the module base directly, set the same attributes it sets and do
        # what it does around the layers (the module docstring lists each).
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
        if getattr(config, "mla_down_proj_fusion", False):  # as HybridStack.__init__
            submodules = self._fused_mla_down_proj(submodules)

        plan = parse_plan(layer_plan).layers
        mine = plan[pp_layer_offset : pp_layer_offset + len(layer_type_list)]
        if len(mine) != len(layer_type_list):
            raise SpecError(f"the plan has {len(plan)} layers but this pipeline "
                            f"segment asks for layers {pp_layer_offset + 1}.."
                            f"{pp_layer_offset + len(layer_type_list)}")
        self.layer_letters = "".join(layer.letter for layer in mine)
        self.layers = _build_layers(config, submodules, mine, layer_type_list,
                                    pp_layer_offset, pg_collection, is_mtp_layer, name)
        if config.cuda_graph_impl == "local":  # as HybridStack.__init__
            annotate_first_last_layer(self.layers)
        self.num_layers_per_pipeline_rank = len(self.layers)
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=config,
                                           hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)

    def _fused_mla_down_proj(self, submodules: MegacppStackSubmodules
                             ) -> MegacppStackSubmodules:
        """Upstream's MLA down-projection fusion (a fused copy of ``submodules``), where it
        can be done faithfully: TE's MLA layer, and one to fuse."""
        if self.config.transformer_impl != "transformer_engine":
            raise SpecError(MLA_FUSION_NEEDS_TE)
        if not isinstance(submodules.mla_layer, ModuleSpec):
            raise SpecError(MLA_FUSION_WITHOUT_MLA)
        return self._fuse_mla_down_proj(submodules)


MLA_FUSION_NEEDS_TE = (
    "mla_down_proj_fusion needs backend te: Megatron fuses MLA's input norm and q/kv down "
    "projections into one Transformer Engine LayerNormColumnParallelLinear "
    "(HybridStack._fuse_mla_down_proj), and the local backend's MLA (a torch norm, then "
    "column-parallel down projections) has no fused form; turn mla_down_proj_fusion off or "
    "build with backend te")
MLA_FUSION_WITHOUT_MLA = (
    "mla_down_proj_fusion: the model has no MLA layer to fuse (Megatron fuses only the MLA "
    "slot, not DSA or GQA attention); turn mla_down_proj_fusion off")


def _quant_init_context(config, index: int):
    """Upstream's quantised-init context for the layer of global 0-based ``index``."""
    if config.fp8:
        return get_fp8_context(config, index, is_init=True)
    if config.fp4:
        return get_fp4_context(config, index, is_init=True)
    return nullcontext()


def _build_layers(config, submodules, plan, symbols, offset, pg_collection, is_mtp, name):
    """Each layer from the spec in its plan's slot, once HybridModel's symbol for it agrees."""
    import torch

    layers = torch.nn.ModuleList()
    for i, (layer, symbol) in enumerate(zip(plan, symbols, strict=True)):
        number = offset + i + 1
        letter = layer.letter
        if layer.symbol != symbol:
            raise SpecError(
                f"layer {number}: the plan says {layer.token!r} (Megatron symbol "
                f"{layer.symbol!r}) but HybridModel's pattern has {symbol!r}; the "
                "--hybrid-layer-pattern and the plugin's plan disagree")
        slot = layer.slot
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
        with _quant_init_context(config, offset + i):  # as HybridStack.__init__
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


def build_stack_submodules(layer_plan: ModelPlan | Layout, model: ModelConfig,
                           plan: BackendPlan) -> MegacppStackSubmodules:
    """Layer specs for every family and variant ``layer_plan`` uses (others stay empty); a
    layout is resolved into its plan with ``model``."""
    provider = provider_for(plan.built)
    if isinstance(layer_plan, Layout):
        layer_plan = plan_layers(layer_plan, model)
    layout = layer_plan.layout
    if any(layer.letter == "R" for layer in layer_plan.mtp_layers):
        raise SpecError(
            "R in multi-token-prediction layers is not supported: Megatron's MTP block builds "
            "its layers by Megatron symbol, and R has none. Keep R in the main pattern.")
    sub = MegacppStackSubmodules()
    if layout.has("A"):
        for variant in sorted(layer_plan.variants("A")):
            setattr(sub, ATTENTION_SLOTS[variant], attention_layer_spec(provider, variant))
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


def build_stack_spec(layer_plan: ModelPlan | Layout, model: ModelConfig, plan: BackendPlan
                     ) -> ModuleSpec:
    """The stack spec for the per-layer plan ``layer_plan`` (:mod:`megacpp_mcore.plan`)
    built as the backend ``plan`` decided: pass it to HybridModel with
    ``hybrid_layer_pattern=layer_plan.megatron_pattern`` (a layout is resolved into its plan
    with ``model``). The stack gets the plan in its ``--megacpp-plan`` form (a string: the
    spec stays plain data for Megatron's config dumps)."""
    if isinstance(layer_plan, Layout):
        layer_plan = plan_layers(layer_plan, model).with_paths(plan.paths())
    return ModuleSpec(
        module=MegacppHybridStack,
        params={"layer_plan": layer_plan.flag, "backend_record": plan.record()},
        submodules=build_stack_submodules(layer_plan, model, plan),
    )

__all__ = [
    "MegacppHybridStack",
    "MegacppStackSubmodules",
    "build_stack_spec",
    "build_stack_submodules",
]

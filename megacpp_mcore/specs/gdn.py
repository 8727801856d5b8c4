"""Letter G: Megatron's Gated DeltaNet (needs flash-linear-attention and CUDA; the dispatcher
refuses G before anything is built when either is missing).

``te``: stock Megatron's hybrid GDN layer. ``local``: a torch pre-norm and output norm with
Megatron's local linears.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megacpp_mcore.layers.norm import LocalNorm


def gdn_layer_spec(backend: str) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return hybrid_stack_spec.submodules.gdn_layer
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=ModuleSpec(
                module=GatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(
                    in_proj=ColumnParallelLinear, out_norm=LocalNorm, out_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )

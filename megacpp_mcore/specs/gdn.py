"""Letter G: Megatron's Gated DeltaNet (needs flash-linear-attention and CUDA; the dispatcher
refuses G before anything is built when either is missing).

Built from the backend's spec provider: TE fuses the pre-norm into the input projection
(stock Megatron's hybrid GDN layer); local is a torch pre-norm with Megatron's local linears.
The output norm is the backend's norm.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megacpp_mcore.specs.providers import norm_and_column_linear


def gdn_layer_spec(provider: BackendSpecProvider) -> ModuleSpec:
    norm, in_proj = norm_and_column_linear(provider)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=GatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(
                    in_proj=in_proj, out_norm=provider.layer_norm(),
                    out_proj=provider.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )

"""Letter F: Megatron's dense MLP layer (``MLPLayer``: norm + MLP + residual).

Built from the backend's spec provider: TE fuses the norm into fc1 (stock Megatron's hybrid
MLP layer, TE LayerNormColumnParallelLinear); local is a torch norm and Megatron's local
column/row-parallel linears.
"""

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megacpp_mcore.specs.providers import norm_and_column_linear


def mlp_layer_spec(provider: BackendSpecProvider) -> ModuleSpec:
    norm, linear_fc1 = norm_and_column_linear(provider)
    return ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=partial(
                MLP.as_mlp_submodule,
                submodules=MLPSubmodules(
                    linear_fc1=linear_fc1, linear_fc2=provider.row_parallel_linear()
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )

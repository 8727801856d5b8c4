"""What the project's mixers (M, R) share as layers: Megatron's ``MambaLayer`` (norm + mixer
+ residual) around the mixer, with the backend's norm and projections.

From the backend's spec provider: TE fuses the pre-norm into the input projection (as stock
Megatron's Mamba layer does), so the layer's own norm is an identity; local uses a torch norm
then Megatron's local linears.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.specs.providers import norm_and_column_linear


def mixer_layer_spec(provider: BackendSpecProvider, mixer: type, submodules_cls: type,
                     params: dict) -> ModuleSpec:
    """``MambaLayer`` holding ``mixer`` (built with ``params`` and the provider's
    projections)."""
    norm, in_proj = norm_and_column_linear(provider)
    return ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(
                module=mixer,
                params=params,
                submodules=submodules_cls(in_proj=in_proj,
                                          out_proj=provider.row_parallel_linear()),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )

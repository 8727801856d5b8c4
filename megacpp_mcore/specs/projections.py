"""What the project's mixers (M, R) share as layers: Megatron's ``MambaLayer`` (norm + mixer
+ residual) around the mixer, with the backend's norm and projections.

``te`` fuses the pre-norm into the input projection (as stock Megatron's Mamba layer does),
so the layer's own norm is an identity; ``local`` uses a torch norm then Megatron's local
linears.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.layers.norm import LocalNorm


def projections(backend: str):
    """``(norm or None, in_proj, out_proj)`` for a mixer layer."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return None, TELayerNormColumnParallelLinear, TERowParallelLinear
    return LocalNorm, ColumnParallelLinear, RowParallelLinear


def mixer_layer_spec(backend: str, mixer: type, submodules_cls: type, params: dict) -> ModuleSpec:
    """``MambaLayer`` holding ``mixer`` (built with ``params`` and the backend's projections)."""
    norm, in_proj, out_proj = projections(backend)
    return ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm or IdentityOp,
            mixer=ModuleSpec(
                module=mixer,
                params=params,
                submodules=submodules_cls(in_proj=in_proj, out_proj=out_proj),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )

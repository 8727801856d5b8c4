"""Letter E: Megatron's MoE layer (top-k router with load-balancing loss, experts, optional
shared expert), in a ``MoETransformerLayer`` (norm + MoE + residual).

``te``: TE norm, and TE grouped-GEMM experts when ``grouped_gemm`` (as stock Megatron's hybrid
spec) else TE linears one expert at a time. ``local``: a torch norm and Megatron's
``SequentialMLP`` experts (one GEMM pair per expert; what runs on CPU). The token dispatcher
(alltoall / allgather) is a TransformerConfig setting, not part of the spec.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayerSubmodules,
)

from megacpp_mcore.layers.norm import LocalNorm


def moe_layer_spec(backend: str, num_experts: int, grouped_gemm: bool) -> ModuleSpec:
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    else:
        norm = LocalNorm
        grouped_gemm = False  # Megatron's local provider has only SequentialMLP experts
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=get_moe_module_spec(
                use_te=backend == "te", num_experts=num_experts, moe_grouped_gemm=grouped_gemm
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )

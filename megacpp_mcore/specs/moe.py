"""Letter E: Megatron's MoE layer (top-k router with load-balancing loss, experts, optional
shared expert), in a ``MoETransformerLayer`` (norm + MoE + residual).

Built from the backend's spec provider with Megatron's own MoE spec builder
(``get_moe_module_spec_for_backend``). TE: TE norm, and TE grouped-GEMM experts when
``grouped_gemm`` (as stock Megatron's hybrid spec) else TE linears one expert at a time;
``expert_gemm: torch`` keeps Megatron's ``TEGroupedMLP`` and its parameters but runs each
projection as one torch grouped GEMM (``layers.grouped_experts``). Local: a torch norm and
Megatron's ``SequentialMLP`` experts (one GEMM pair per expert; what runs on CPU). The token
dispatcher (alltoall / allgather) is a TransformerConfig setting, not part of the spec.
``backend.experts_kernel`` decides which experts are built, and the backend record says so.
"""

import dataclasses
from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayerSubmodules,
)

from megacpp_mcore.backend import experts_kernel
from megacpp_mcore.layers.grouped_experts import torch_grouped_linears
from megacpp_mcore.settings.config import MoEConfig
from megacpp_mcore.specs.providers import is_transformer_engine


def moe_layer_spec(provider: BackendSpecProvider, moe: MoEConfig) -> ModuleSpec:
    # The experts kernel is backend.experts_kernel's decision, asked for this provider's
    # backend: only TE has grouped experts (te or torch); no provider method says which.
    built = "te" if is_transformer_engine(provider) else "local"
    kernel = experts_kernel(built, moe.grouped_gemm, moe.expert_gemm)
    mlp = get_moe_module_spec_for_backend(provider, num_experts=moe.num_experts,
                                          moe_grouped_gemm=kernel != "sequential")
    if kernel == "torch":
        mlp = _with_torch_grouped_experts(mlp)
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=provider.layer_norm(), mlp=mlp, mlp_bda=get_bias_dropout_add),
    )


def _with_torch_grouped_experts(moe_builder: partial) -> partial:
    """Megatron's MoE builder with its TEGroupedMLP's fc1/fc2 swapped for the torch
    grouped-GEMM linears (everything else, parameters included, as Megatron builds it)."""
    column, row = torch_grouped_linears()
    experts = _with_submodules(moe_builder.keywords["submodules"].experts,
                               linear_fc1=column, linear_fc2=row)
    return _with_submodules(moe_builder, experts=experts)


def _with_submodules(builder: partial, **changes) -> partial:
    """``builder`` (a ``partial`` holding ``submodules=``) with those submodules changed."""
    submodules = dataclasses.replace(builder.keywords["submodules"], **changes)
    return partial(builder.func, *builder.args, **{**builder.keywords, "submodules": submodules})

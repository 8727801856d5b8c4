"""Letter A: Megatron self-attention (grouped-query, RoPE or none as the model config says).

``te``: exactly stock Megatron's hybrid attention layer (TE fused norm + QKV, TE core
attention). ``local``: Megatron's local column/row-parallel linears, a torch norm and
``SDPACoreAttention`` (torch's scaled_dot_product_attention) as the core.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layers.sdpa import SDPACoreAttention


def attention_layer_spec(backend: str) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return hybrid_stack_spec.submodules.attention_layer
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )

"""Letter A: Megatron attention, one of three variants per position (from the recipe).

``gqa``: Megatron's SelfAttention (grouped-query, RoPE or none as the model config says).
``mla``: Megatron's multi-latent attention (``MLASelfAttention``). ``dsa``: DeepSeek sparse
attention (``AbsorbedMLASelfAttention`` over ``DSAttention`` with its top-k indexer).

``te``: exactly stock Megatron's hybrid layers for each variant. ``local``: Megatron's local
column/row-parallel linears, a torch norm and ``SDPACoreAttention`` (torch's
scaled_dot_product_attention) as the core, following Megatron's local GPT spec for MLA;
DSA is built only with ``te`` (Megatron has no local DSA spec). MLA and DSA need CUDA
(Megatron builds their rotary embedding on the current CUDA device; see ``backend``).
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layers.sdpa import SDPACoreAttention

#: variant -> the slot of Megatron's HybridStackSubmodules that holds its layer spec.
VARIANT_SLOTS = {"gqa": "attention_layer", "mla": "mla_layer", "dsa": "dsa_layer"}


def _layer(attention: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def _local_gqa() -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def _local_mla() -> ModuleSpec:
    # Megatron's local GPT spec for MLA uses column-parallel linears for every projection.
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            kv_layernorm=IdentityOp,
        ),
    )


def attention_layer_spec(backend: str, variant: str = "gqa") -> ModuleSpec:
    """The layer spec of an A position of ``variant`` (gqa, mla, dsa) on ``backend``."""
    if variant not in VARIANT_SLOTS:
        raise SpecError(f"attention variant {variant!r}; accepted: {', '.join(VARIANT_SLOTS)}")
    if backend == "te":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return getattr(hybrid_stack_spec.submodules, VARIANT_SLOTS[variant])
    if variant == "gqa":
        return _layer(_local_gqa())
    if variant == "mla":
        return _layer(_local_mla())
    raise SpecError(
        "attention variant dsa needs backend te: Megatron-Core 0.19.2 builds DSA "
        "(AbsorbedMLASelfAttention + DSAttention) only in its Transformer Engine hybrid spec, "
        "and its indexer kernels need CUDA; use backend te on a GPU machine, or mla/gqa here")

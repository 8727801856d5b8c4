"""Letter A: Megatron attention, one of three variants per position (from the recipe).

``gqa``: Megatron's SelfAttention (grouped-query, RoPE or none as the model config says).
``mla``: Megatron's multi-latent attention (``MLASelfAttention``). ``dsa``: DeepSeek sparse
attention (``AbsorbedMLASelfAttention`` over ``DSAttention`` with its top-k indexer).

Built from the backend's spec provider (``specs.providers``): with Megatron's TE provider each
variant is stock Megatron's hybrid layer, submodule by submodule (``tests/test_specs.py``
checks it); with the local provider, Megatron's local column/row-parallel linears, a torch
norm and ``SDPACoreAttention`` (torch's scaled_dot_product_attention) as the core, following
Megatron's local GPT spec for MLA. DSA is built only with TE (Megatron has no local DSA
spec). MLA and DSA need CUDA (Megatron builds their rotary embedding on the current CUDA
device; see ``backend``).
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant.absorbed_mla import (
    AbsorbedMLASelfAttention,
    AbsorbedMLASelfAttentionSubmodules,
)
from megatron.core.transformer.experimental_attention_variant.dsa import (
    DSAIndexer,
    DSAIndexerSubmodules,
    DSAttention,
    DSAttentionSubmodules,
)
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
from megacpp_mcore.specs.providers import is_transformer_engine, norm_and_column_linear
from megacpp_mcore.supported import MEGATRON_CORE

DSA_NEEDS_TE = (
    f"attention variant dsa needs backend te: Megatron-Core {MEGATRON_CORE} builds DSA "
    "(AbsorbedMLASelfAttention + DSAttention) only in its Transformer Engine hybrid spec, "
    "and its indexer kernels need CUDA; use backend te on a GPU machine, or mla/gqa here")


def _layer(input_layernorm: type, attention: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_layernorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def _gqa(provider: BackendSpecProvider) -> ModuleSpec:
    norm, linear_qkv = norm_and_column_linear(provider)
    # No q/k norm either way: Megatron's hybrid TE spec leaves the slots unset (None), its
    # local GPT spec fills them with IdentityOp; each backend keeps its upstream form.
    qk_norm = None if provider.fuse_layernorm_and_linear() else IdentityOp
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    return _layer(norm, attention)


def _down_projection(provider: BackendSpecProvider) -> type:
    """MLA's q/kv down projections: TE's unsharded ``TELinear`` (``provider.linear()``, which
    Megatron's local provider lacks) as in Megatron's hybrid spec; Megatron's local GPT spec
    uses a column-parallel linear."""
    if is_transformer_engine(provider):
        return provider.linear()
    return provider.column_parallel_linear()


def _mla(provider: BackendSpecProvider) -> ModuleSpec:
    column, down = provider.column_parallel_linear(), _down_projection(provider)
    attention = ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=column,
            linear_q_down_proj=down,
            linear_q_up_proj=column,
            linear_kv_down_proj=down,
            linear_kv_up_proj=column,
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=IdentityOp,
            kv_layernorm=IdentityOp,
        ),
    )
    return _layer(provider.layer_norm(), attention)


def _dsa(provider: BackendSpecProvider) -> ModuleSpec:
    if not is_transformer_engine(provider):
        raise SpecError(DSA_NEEDS_TE)
    column, linear = provider.column_parallel_linear(), provider.linear()
    indexer = ModuleSpec(
        module=DSAIndexer,
        submodules=DSAIndexerSubmodules(
            linear_wq_b=linear, linear_wk=linear, k_norm=provider.layer_norm(),
            linear_weights_proj=linear),
    )
    attention = ModuleSpec(
        module=AbsorbedMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=AbsorbedMLASelfAttentionSubmodules(
            linear_q_proj=column,
            linear_q_down_proj=linear,
            linear_q_up_proj=column,
            linear_kv_down_proj=linear,
            linear_kv_up_proj=column,
            core_attention=ModuleSpec(
                module=DSAttention, submodules=DSAttentionSubmodules(indexer=indexer)),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=IdentityOp,
            kv_layernorm=IdentityOp,
        ),
    )
    return _layer(provider.layer_norm(), attention)


_BUILDERS = {"gqa": _gqa, "mla": _mla, "dsa": _dsa}


def attention_layer_spec(provider: BackendSpecProvider, variant: str = "gqa") -> ModuleSpec:
    """The layer spec of an A position of ``variant`` (gqa, mla, dsa) with ``provider``'s
    modules (``specs.providers.provider_for(plan.built)``)."""
    if variant not in _BUILDERS:
        raise SpecError(f"attention variant {variant!r}; accepted: {', '.join(_BUILDERS)}")
    return _BUILDERS[variant](provider)

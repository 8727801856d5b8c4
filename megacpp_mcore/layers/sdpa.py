"""The local backend's attention core: ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for Megatron's ``DotProductAttention`` (same constructor and ``forward``), which
would materialise the full score matrix through Megatron's CUDA-only global memory buffer.
SDPA picks flash / memory-efficient kernels on GPU and runs on CPU too; grouped-query
attention is passed through (``enable_gqa``) instead of repeating keys and values. The spec
builders get it from ``specs.providers.MegacppLocalSpecProvider.core_attention()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Core attention over ``[s, b, heads, head_dim]`` tensors, returning ``[s, b, heads*dim]``.

    Causal layers apply the causal mask themselves (as Transformer Engine's core attention
    does for ``AttnMaskType.causal``); an explicit mask is honoured for the padding and
    arbitrary mask types (True means "masked out", Megatron's convention).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        """``k_channels``/``v_channels``: per-head query-key and value widths where they
        differ from ``kv_channels`` (multi-latent attention passes both); SDPA takes values of
        another width than queries and keys as they are."""
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "the local backend's SDPA attention does not split the sequence "
                "(context_parallel_size must be 1); use backend te for context parallelism"
            )
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.heads_per_rank = divide(config.num_attention_heads, tp_size)
        self.groups_per_rank = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(k_channels or config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "SDPA core attention supports neither packed sequences nor attention bias; "
                "use backend te"
            )
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None if causal or attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=self.heads_per_rank != self.groups_per_rank,
        )
        # [b, n, s, d] -> [s, b, n * d]
        sq, batch = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)

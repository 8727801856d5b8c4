"""The recurrent mixer of letter R: an M2RNN-style matrix-state RNN.

Megatron has no counterpart; this module sits in Megatron's ``MambaLayer`` (norm + mixer +
residual) the way the Mamba mixer does. Per tensor-parallel rank it owns whole heads:

* ``in_proj`` (column parallel): hidden -> q | k | v | g | f, laid out per rank as
  ``[q (H*K) | k (H*K) | v (H*V) | g (H*V) | f (H)]`` for its H local heads;
* a depthwise causal convolution (``conv1d_weight``/``conv1d_bias``) + SiLU on q, k, v;
* forget gate ``f = exp(-exp(A_log) * softplus(f_in + dt_bias))`` per head and step;
* the recurrence (``ops.m2rnn_scan``): ``h = f h + (1 - f) tanh(h W + k (x) v)``,
  ``y = q . h`` with ``W`` a per-head V x V state matrix initialised to the identity;
* ``y + D v``, times ``silu(g)``, an RMS norm per head, and ``out_proj`` (row parallel).

The scan path (``fused`` Triton kernel on CUDA, ``reference`` PyTorch loop anywhere) is fixed
at construction by the backend dispatcher and recorded; it is never switched silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megacpp_mcore.layers.mixer_common import (
    causal_depthwise_conv,
    consecutive_parts,
    conv_init,
    dt_bias_init,
    grouped_rms_norm,
    in_projection,
    local_parts,
    mixer_sharded_state_dict,
    new_parameter,
    out_projection,
    rank_slice,
    refuse_non_training_inputs,
)
from megacpp_mcore.ops.m2rnn_scan import m2rnn_scan

PATHS = ("fused", "reference")
NORM_EPS = 1e-5


@dataclass
class RecurrentMixerSubmodules:
    """The two tensor-parallel projections of the R mixer."""

    in_proj: Any = None
    out_proj: Any = None


class RecurrentMixer(MegatronModule):
    """M2RNN mixer over ``[s, b, hidden]``; returns ``(out, out_bias)`` like Megatron's mixers."""

    def __init__(
        self,
        config,
        submodules: RecurrentMixerSubmodules,
        d_model: int,
        layer_number: int | None = None,
        pg_collection=None,
        pp_layer_offset: int = 0,
        name: str | None = None,
        *,
        path: str,
        num_heads: int,
        k_head_dim: int = 64,
        v_head_dim: int = 16,
        conv_kernel: int = 4,
        backward_chunk: int = 64,
    ):
        super().__init__(config)
        if path not in PATHS:
            raise ValueError(f"RecurrentMixer path {path!r}; accepted: {', '.join(PATHS)}")
        if pg_collection.cp.size() != 1:
            raise ValueError("the R mixer does not support context parallelism (cp size 1)")
        self.path = path
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        if num_heads % tp_size:
            raise ValueError(f"R heads ({num_heads}) must divide by tensor parallel {tp_size}")
        self.num_heads = num_heads
        self.heads_local = num_heads // tp_size
        self.k_head_dim, self.v_head_dim = k_head_dim, v_head_dim
        self.backward_chunk = backward_chunk
        H, K, V = num_heads, k_head_dim, v_head_dim

        self.in_proj = in_projection(submodules.in_proj, d_model,
                                     [H * K, H * K, H * V, H * V, H], config, self.tp_group)
        q_w, q_b = conv_init(H * K, conv_kernel)
        k_w, k_b = conv_init(H * K, conv_kernel)
        v_w, v_b = conv_init(H * V, conv_kernel)
        self.conv1d_weight = new_parameter(local_parts([q_w, k_w, v_w], tp_rank, tp_size), config)
        self.conv1d_bias = new_parameter(local_parts([q_b, k_b, v_b], tp_rank, tp_size), config)
        self.dt_bias = new_parameter(rank_slice(dt_bias_init(H), tp_rank, tp_size), config)
        A = torch.empty(H).uniform_(0, 16).clamp_(min=1e-4)
        self.A_log = new_parameter(rank_slice(torch.log(A), tp_rank, tp_size), config,
                                   dtype=torch.float32)
        self.D = new_parameter(torch.ones(self.heads_local), config, dtype=torch.float32)
        self.state_weight = new_parameter(
            torch.eye(V).expand(self.heads_local, V, V), config, dtype=torch.float32
        )
        self.norm_weight = new_parameter(torch.ones(self.heads_local * V), config)
        self.out_proj = out_projection(submodules.out_proj, H * V, d_model, config,
                                       self.tp_group)

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        refuse_non_training_inputs("R", inference_context, inference_params, packed_seq_params)
        projected, _ = self.in_proj(hidden_states)  # [l, b, d]
        y = self.mix(projected.transpose(0, 1))
        return self.out_proj(y.transpose(0, 1).contiguous())

    def mix(self, projected: torch.Tensor) -> torch.Tensor:
        """``[b, l, H*(2K+2V+1)]`` projections -> ``[b, l, H*V]`` normalised, gated output."""
        batch, length, _ = projected.shape
        H, K, V = self.heads_local, self.k_head_dim, self.v_head_dim
        qkv, g, f = torch.split(projected, [H * (2 * K + V), H * V, H], dim=-1)
        qkv = F.silu(causal_depthwise_conv(qkv, self.conv1d_weight, self.conv1d_bias))
        q, k, v = torch.split(qkv, [H * K, H * K, H * V], dim=-1)
        q = q.reshape(batch, length, H, K)
        k = k.reshape(batch, length, H, K)
        v = v.reshape(batch, length, H, V)
        forget = torch.exp(-torch.exp(self.A_log.float())
                           * F.softplus(f.float() + self.dt_bias.float()))
        y, _ = m2rnn_scan(q, k, v, forget, self.state_weight, path=self.path,
                          backward_chunk=self.backward_chunk)
        y = (y.float() + self.D.float()[:, None] * v.float()) * F.silu(
            g.float().reshape(batch, length, H, V))
        y = grouped_rms_norm(y.reshape(batch, length, H * V), self.norm_weight, V, NORM_EPS)
        return y.to(projected.dtype)

    def plasticity_parts(self) -> list[tuple]:
        """The logical parts of the projections, for plasticity tools (``plasticity.parts``):
        ``(name, parameter, local row ranges or None, tensor-parallel dim)``. ``in_proj`` is
        column parallel with the local rows q | k | v | g | f (see the module docstring);
        ``state`` is the per-head state matrix W (never touched unless a tool asks for it)."""
        H, K, V = self.heads_local, self.k_head_dim, self.v_head_dim
        sizes = {"q": H * K, "k": H * K, "v": H * V, "g": H * V, "f": H}
        return [*consecutive_parts(self.in_proj.weight, sizes, tp_dim=0),
                ("out", self.out_proj.weight, None, 1),
                ("state", self.state_weight, None, 0)]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return mixer_sharded_state_dict(
            self, prefix, sharded_offsets, metadata,
            ("conv1d_weight", "conv1d_bias", "dt_bias", "A_log", "D", "state_weight",
             "norm_weight"),
        )

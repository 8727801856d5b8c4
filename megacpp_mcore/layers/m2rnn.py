"""The recurrent mixer of letter R: an M2RNN-style matrix-state RNN.

Megatron has no counterpart; this module sits in Megatron's ``MambaLayer`` (norm + mixer +
residual) the way the Mamba mixer does. Per tensor-parallel rank it owns whole heads:

* ``in_proj`` (column parallel): hidden -> q | k | v | g | f (or q | k | v | f | g, the
  seed's order), laid out per rank as ``[part1_local | part2_local | ...]``; q and k are
  ``H*K`` wide per head, or ``K`` wide when shared by all heads (the seed's layer);
  :meth:`RecurrentMixer.in_proj_parts` declares the parts, in order, with their widths;
* a depthwise causal convolution (``conv1d_weight``/``conv1d_bias``) + SiLU on q, k, v;
* forget gate ``f = exp(-exp(A_log) * softplus(f_in + dt_bias))`` per head and step;
* the recurrence (``ops.m2rnn``): ``h = f h + (1 - f) tanh(h W + k (x) v)``,
  ``y = q . h`` with ``W`` a per-head V x V state matrix initialised to the identity;
* ``y + D v`` (D per head or per channel), times ``silu(g)``, an RMS norm per head or over
  the whole output, and ``out_proj`` (row parallel).

The seed's form (shared q/k, whole-output norm) works on whole-layer quantities, so it is
built only at tensor-parallel size 1 (refused above it; not replicated).

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
    linear_default_init,
    local_parts,
    mixer_sharded_state_dict,
    new_parameter,
    out_projection,
    rank_slice,
    refuse_non_training_inputs,
)
from megacpp_mcore.ops.m2rnn.dispatch import m2rnn_scan

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
        num_heads: int | None,
        k_head_dim: int = 64,
        v_head_dim: int = 16,
        conv_kernel: int = 4,
        backward_chunk: int = 64,
        qk_heads: str = "per_head",
        in_proj_order: str = "qkvgf",
        skip_scale: str = "per_head",
        norm: str = "per_head",
        proj_init: str = "normal",
        forget_bf16: bool = False,
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
        if num_heads is None:
            num_heads = d_model // (k_head_dim + v_head_dim)
        if num_heads % tp_size:
            raise ValueError(f"R heads ({num_heads}) must divide by tensor parallel {tp_size}")
        self.shared_qk = qk_heads == "shared"
        if tp_size > 1 and (self.shared_qk or norm == "whole"):
            raise ValueError("the seed's R form (shared q/k heads, one norm over the whole "
                             "output) is built at tensor parallel 1 only; got "
                             f"{tp_size} (refused, not replicated)")
        self.num_heads = num_heads
        self.heads_local = num_heads // tp_size
        self.k_head_dim, self.v_head_dim = k_head_dim, v_head_dim
        self.backward_chunk = backward_chunk
        self.in_proj_order, self.norm, self.forget_bf16 = in_proj_order, norm, forget_bf16
        H, K, V = num_heads, k_head_dim, v_head_dim
        QK = K if self.shared_qk else H * K

        widths = dict(self.in_proj_parts())
        self.in_proj = in_projection(submodules.in_proj, d_model, list(widths.values()),
                                     config, self.tp_group)
        q_w, q_b = conv_init(QK, conv_kernel)
        k_w, k_b = conv_init(QK, conv_kernel)
        v_w, v_b = conv_init(H * V, conv_kernel)
        self.conv1d_weight = new_parameter(local_parts([q_w, k_w, v_w], tp_rank, tp_size), config)
        self.conv1d_bias = new_parameter(local_parts([q_b, k_b, v_b], tp_rank, tp_size), config)
        self.dt_bias = new_parameter(rank_slice(dt_bias_init(H), tp_rank, tp_size), config)
        A = torch.empty(H).uniform_(0, 16).clamp_(min=1e-4)
        self.A_log = new_parameter(rank_slice(torch.log(A), tp_rank, tp_size), config,
                                   dtype=torch.float32)
        D = torch.ones(self.heads_local, V) if skip_scale == "per_channel" else torch.ones(
            self.heads_local)
        self.D = new_parameter(D, config, dtype=torch.float32)
        self.state_weight = new_parameter(
            torch.eye(V).expand(self.heads_local, V, V), config, dtype=torch.float32
        )
        self.norm_weight = new_parameter(torch.ones(self.heads_local * V), config)
        self.out_proj = out_projection(submodules.out_proj, H * V, d_model, config,
                                       self.tp_group)
        if proj_init == "linear_default":
            linear_default_init(self.in_proj, list(widths.values()), config, tp_rank, tp_size)
            linear_default_init(self.out_proj, None, config, tp_rank, tp_size)

    def in_proj_parts(self) -> list[tuple[str, int]]:
        """The fused input projection's parts, in order, with their full (all-rank) widths.

        Each part is split along the output dim (0) across tensor-parallel ranks, and a
        rank's rows are ``[part1_local | part2_local | ...]`` in this order. Names: q, k
        (``K`` wide when shared by all heads, else ``heads * K``), v and g (``heads * V``),
        f (``heads``). Tools that touch in_proj's geometry (plasticity) read this.
        """
        H, K, V = self.num_heads, self.k_head_dim, self.v_head_dim
        QK = K if self.shared_qk else H * K
        tail = [("g", H * V), ("f", H)] if self.in_proj_order == "qkvgf" else [
            ("f", H), ("g", H * V)]
        return [("q", QK), ("k", QK), ("v", H * V), *tail]

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        refuse_non_training_inputs("R", inference_context, inference_params, packed_seq_params)
        projected, _ = self.in_proj(hidden_states)  # [l, b, d]
        y = self.mix(projected.transpose(0, 1))
        return self.out_proj(y.transpose(0, 1).contiguous())

    def mix(self, projected: torch.Tensor) -> torch.Tensor:
        """``[b, l, in_proj width]`` projections -> ``[b, l, H*V]`` normalised, gated output."""
        batch, length, _ = projected.shape
        H, K, V = self.heads_local, self.k_head_dim, self.v_head_dim
        HQ = 1 if self.shared_qk else H
        names = [name for name, _ in self.in_proj_parts()]
        local = {"q": HQ * K, "k": HQ * K, "v": H * V, "g": H * V, "f": H}
        parts = dict(zip(names, torch.split(projected, [local[n] for n in names], dim=-1),
                         strict=True))
        qkv = torch.cat([parts["q"], parts["k"], parts["v"]], dim=-1)
        qkv = F.silu(causal_depthwise_conv(qkv, self.conv1d_weight, self.conv1d_bias))
        q, k, v = torch.split(qkv, [HQ * K, HQ * K, H * V], dim=-1)
        q = q.reshape(batch, length, HQ, K)
        k = k.reshape(batch, length, HQ, K)
        v = v.reshape(batch, length, H, V)
        forget = torch.exp(-torch.exp(self.A_log.float())
                           * F.softplus(parts["f"].float() + self.dt_bias.float()))
        if self.forget_bf16:
            forget = forget.to(torch.bfloat16)
        y, _ = m2rnn_scan(q, k, v, forget, self.state_weight, path=self.path,
                          backward_chunk=self.backward_chunk)
        D = self.D.float() if self.D.dim() == 2 else self.D.float()[:, None]
        y = (y.float() + D * v.float()) * F.silu(parts["g"].float().reshape(batch, length, H, V))
        group = H * V if self.norm == "whole" else V
        y = grouped_rms_norm(y.reshape(batch, length, H * V), self.norm_weight, group, NORM_EPS)
        return y.to(projected.dtype)

    def local_in_proj_parts(self) -> list[tuple[str, int]]:
        """:meth:`in_proj_parts` per tensor-parallel rank (every part split evenly on dim 0)."""
        tp = self.num_heads // self.heads_local
        return [(name, width // tp) for name, width in self.in_proj_parts()]

    def fused_parts(self) -> dict[str, list[tuple[str, int]]]:
        """The logical parts of the fused parameters, per tensor-parallel rank (rows, dim 0),
        in the order this layer's variant declares: checkpoints save them part by part."""
        local = dict(self.local_in_proj_parts())
        conv = [(name, local[name]) for name in ("q", "k", "v")]
        return {"in_proj.weight": self.local_in_proj_parts(), "conv1d_weight": conv,
                "conv1d_bias": conv}

    def plasticity_parts(self) -> list[tuple]:
        """The logical parts of the projections, for plasticity tools (``plasticity.parts``):
        ``(name, parameter, local row ranges or None, tensor-parallel dim)``. ``in_proj`` is
        column parallel with the local rows in :meth:`in_proj_parts` order; ``state`` is the
        per-head state matrix W (never touched unless a tool asks for it)."""
        sizes = dict(self.local_in_proj_parts())
        return [*consecutive_parts(self.in_proj.weight, sizes, tp_dim=0),
                ("out", self.out_proj.weight, None, 1),
                ("state", self.state_weight, None, 0)]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return mixer_sharded_state_dict(
            self, prefix, sharded_offsets, metadata,
            ("conv1d_weight", "conv1d_bias", "dt_bias", "A_log", "D", "state_weight",
             "norm_weight"),
            fused_parts=self.fused_parts(),
        )

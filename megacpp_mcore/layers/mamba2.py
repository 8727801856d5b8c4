"""The Mamba-2 mixer of letter M, with a fused GPU path and a plain-PyTorch reference path.

It has Megatron's ``MambaMixer`` parameter layout (``in_proj`` = z | x | B | C | dt per
tensor-parallel rank, ``conv1d_weight``/``conv1d_bias`` over x | B | C, per-head ``dt_bias``,
``A_log``, ``D``, a grouped gated RMS norm, ``out_proj``) and sits in Megatron's
``MambaLayer``. Megatron's own mixer cannot be built without mamba-ssm and CUDA; this one
chooses its scan path once, at construction, from what the backend dispatcher decided:

* ``fused``: mamba-ssm's ``mamba_split_conv1d_scan_combined`` and its gated RMS norm kernel
  (the same calls Megatron's mixer makes in training);
* ``reference``: causal conv + ``ops.ssd.ssd_scan_reference`` + norm in plain PyTorch (CPU).

Both compute ``out_proj(rmsnorm_groups((ssd(x) + D x) * silu(z)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
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
from megacpp_mcore.ops.ssd import ssd_scan_reference

PATHS = ("fused", "reference")
NORM_EPS = 1e-5


class Mamba2Mixer(MegatronModule):
    """Mamba-2 mixer over ``[s, b, hidden]``; returns ``(out, out_bias)`` like Megatron's."""

    def __init__(
        self,
        config,
        submodules: MambaMixerSubmodules,
        d_model: int,
        layer_number: int | None = None,
        pg_collection=None,
        pp_layer_offset: int = 0,
        name: str | None = None,
        *,
        path: str,
        conv_kernel: int = 4,
        chunk_size: int = 128,
    ):
        super().__init__(config)
        if path not in PATHS:
            raise ValueError(f"Mamba2Mixer path {path!r}; accepted: {', '.join(PATHS)}")
        if pg_collection.cp.size() != 1:
            raise ValueError("the M mixer does not support context parallelism (cp size 1)")
        self.path = path
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()

        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        self.nheads = config.mamba_num_heads or 2 * d_model // self.headdim
        self.d_inner = self.nheads * self.headdim
        for what, value in (("heads", self.nheads), ("groups", self.ngroups)):
            if value % tp_size:
                raise ValueError(f"Mamba {what} ({value}) must divide by tensor parallel {tp_size}")
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba heads ({self.nheads}) must divide by groups ({self.ngroups})")
        self.nheads_local = self.nheads // tp_size
        self.ngroups_local = self.ngroups // tp_size
        self.d_inner_local = self.d_inner // tp_size
        self.chunk_size = chunk_size

        group_dim = self.ngroups * self.d_state
        self.in_proj = in_projection(
            submodules.in_proj, d_model,
            [self.d_inner, self.d_inner, group_dim, group_dim, self.nheads], config,
            self.tp_group,
        )
        x_w, x_b = conv_init(self.d_inner, conv_kernel)
        b_w, b_b = conv_init(self.ngroups * self.d_state, conv_kernel)
        c_w, c_b = conv_init(self.ngroups * self.d_state, conv_kernel)
        self.conv1d_weight = new_parameter(local_parts([x_w, b_w, c_w], tp_rank, tp_size), config)
        self.conv1d_bias = new_parameter(local_parts([x_b, b_b, c_b], tp_rank, tp_size), config)
        self.dt_bias = new_parameter(rank_slice(dt_bias_init(self.nheads), tp_rank, tp_size),
                                     config)
        A = torch.empty(self.nheads).uniform_(1, 16)
        self.A_log = new_parameter(rank_slice(torch.log(A), tp_rank, tp_size), config,
                                   dtype=torch.float32)
        self.D = new_parameter(torch.ones(self.nheads_local), config, dtype=torch.float32)
        self.norm_weight = new_parameter(torch.ones(self.d_inner_local), config)
        self.out_proj = out_projection(submodules.out_proj, self.d_inner, d_model, config,
                                       self.tp_group)

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        refuse_non_training_inputs("M", inference_context, inference_params, packed_seq_params)
        zxbcdt, _ = self.in_proj(hidden_states)  # [l, b, d]
        zxbcdt = zxbcdt.transpose(0, 1).contiguous()  # [b, l, d]
        y = self._fused(zxbcdt) if self.path == "fused" else self._reference(zxbcdt)
        return self.out_proj(y.transpose(0, 1).contiguous())

    def _fused(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

        if not zxbcdt.is_cuda:
            raise ValueError("the fused M path runs on CUDA tensors only; build with the "
                             "reference path for CPU")
        y = mamba_split_conv1d_scan_combined(
            zxbcdt,
            self.conv1d_weight.squeeze(1),
            self.conv1d_bias,
            self.dt_bias.float(),
            -torch.exp(self.A_log.float()),
            D=self.D,
            chunk_size=self.chunk_size,
            activation="silu",
            headdim=self.headdim,
            ngroups=self.ngroups_local,
            norm_before_gate=False,
        )
        return rmsnorm_fn(y, self.norm_weight, None, z=None, eps=NORM_EPS,
                          group_size=self.d_inner_local // self.ngroups_local,
                          norm_before_gate=False)

    def _reference(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        batch, length, _ = zxbcdt.shape
        group_dim = self.ngroups_local * self.d_state
        z, xbc, dt = torch.split(
            zxbcdt, [self.d_inner_local, self.d_inner_local + 2 * group_dim, self.nheads_local],
            dim=-1,
        )
        xbc = F.silu(causal_depthwise_conv(xbc, self.conv1d_weight, self.conv1d_bias))
        x, B, C = torch.split(xbc, [self.d_inner_local, group_dim, group_dim], dim=-1)
        y, _ = ssd_scan_reference(
            x.reshape(batch, length, self.nheads_local, self.headdim),
            F.softplus(dt.float() + self.dt_bias.float()),
            -torch.exp(self.A_log.float()),
            B.reshape(batch, length, self.ngroups_local, self.d_state),
            C.reshape(batch, length, self.ngroups_local, self.d_state),
            self.chunk_size,
            D=self.D,
        )
        y = y.reshape(batch, length, self.d_inner_local) * F.silu(z.float())
        y = grouped_rms_norm(y, self.norm_weight, self.d_inner_local // self.ngroups_local,
                             NORM_EPS)
        return y.to(zxbcdt.dtype)

    def plasticity_parts(self) -> list[tuple]:
        """The logical parts of the projections, for plasticity tools (``plasticity.parts``):
        ``(name, parameter, local row ranges or None, tensor-parallel dim)``. ``in_proj`` is
        column parallel with the local rows z | x | B | C | dt; ``out_proj`` is row parallel."""
        group_dim = self.ngroups_local * self.d_state
        sizes = {"z": self.d_inner_local, "x": self.d_inner_local, "B": group_dim,
                 "C": group_dim, "dt": self.nheads_local}
        return [*consecutive_parts(self.in_proj.weight, sizes, tp_dim=0),
                ("out", self.out_proj.weight, None, 1)]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return mixer_sharded_state_dict(
            self, prefix, sharded_offsets, metadata,
            ("conv1d_weight", "conv1d_bias", "dt_bias", "A_log", "D", "norm_weight"),
        )

"""Letter M's Mamba-2 mixer: Megatron's ``MambaMixer`` on GPU, its reference twin on CPU.

On a GPU with mamba-ssm the spec builds Megatron's own ``MambaMixer`` (its fused
``mamba_split_conv1d_scan_combined`` training path, so M runs at native speed). Megatron's
mixer cannot be built without mamba-ssm and CUDA (its constructor raises, and allocates on
``torch.cuda.current_device()``), so on CPU the spec builds :class:`Mamba2Mixer`: a plain
PyTorch mixer with exactly ``MambaMixer``'s parameters and checkpoint layout:

* ``in_proj`` (column parallel) = z | x | B | C | dt per tensor-parallel rank;
* ``conv1d_weight [x|B|C, 1, d_conv]``, ``conv1d_bias`` (saved as ``conv1d.weight``/``.bias``);
* per-head ``dt_bias``, ``A_log`` (fp32), ``D`` (fp32); ``norm.weight`` (gated grouped RMS
  norm, norm after gate); ``out_proj`` (row parallel);
* ``sharded_state_dict`` is ``MambaMixer``'s own (in_proj saved as z/x/B/C/dt parts, conv as
  x/B/C parts), so checkpoints move between the two and across tensor-parallel sizes.

Both compute ``out_proj(rmsnorm_groups((ssd(x) + D x) * silu(z)))``; the GPU parity test
holds them together. Size attributes carry ``MambaMixer``'s names (``d_inner``, ``nheads``,
``ngroups``, ``d_state``, ``headdim`` and their ``*_local_tp`` shares), so tools read either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.transformer.module import MegatronModule

from megacpp_mcore.layers.mixer_common import (
    GroupedRMSNorm,
    causal_depthwise_conv,
    consecutive_parts,
    conv_init,
    dt_bias_init,
    in_projection,
    local_parts,
    new_parameter,
    out_projection,
    rank_slice,
    refuse_non_training_inputs,
)
from megacpp_mcore.ops.ssd.reference import ssd_scan_reference

NORM_EPS = 1e-5  # MambaMixer's gated RMS norm epsilon


def mamba_fused_parts(mixer) -> dict[str, list[tuple[str, int]]]:
    """The logical parts of M's fused parameters, per tensor-parallel rank (rows, dim 0).

    Works for Megatron's ``MambaMixer`` and for :class:`Mamba2Mixer` (same size names).
    """
    group = mixer.ngroups_local_tp * mixer.d_state
    conv = [("x", mixer.d_inner_local_tp), ("B", group), ("C", group)]
    return {
        "in_proj.weight": [("z", mixer.d_inner_local_tp), ("x", mixer.d_inner_local_tp),
                           ("B", group), ("C", group), ("dt", mixer.nheads_local_tp)],
        "conv1d_weight": conv,
        "conv1d_bias": conv,
    }


class Mamba2Mixer(MegatronModule):
    """``MambaMixer``'s reference twin over ``[s, b, hidden]``; returns ``(out, out_bias)``."""

    def __init__(
        self,
        config,
        submodules: MambaMixerSubmodules,
        d_model: int,
        d_conv: int = 4,
        chunk_size: int = 128,
        layer_number: int | None = None,
        pg_collection=None,
        pp_layer_offset: int = 0,
        name: str | None = None,
    ):
        super().__init__(config)
        if pg_collection.cp.size() != 1:
            raise ValueError("the reference M mixer does not support context parallelism "
                             "(cp size 1); Megatron's MambaMixer (GPU, mamba-ssm) does")
        self.d_model, self.d_conv, self.chunk_size = d_model, d_conv, chunk_size
        self.layer_number = layer_number
        self.pg_collection = pg_collection
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
        self.nheads_local_tp = self.nheads // tp_size
        self.ngroups_local_tp = self.ngroups // tp_size
        self.d_inner_local_tp = self.d_inner // tp_size

        group_dim = self.ngroups * self.d_state
        self.in_proj = in_projection(
            submodules.in_proj, d_model,
            [self.d_inner, self.d_inner, group_dim, group_dim, self.nheads], config,
            self.tp_group,
        )
        parts = self.fused_parts()
        self.in_proj.weight.partition_sizes = [size for _, size in parts["in_proj.weight"]]
        x_w, x_b = conv_init(self.d_inner, d_conv)
        b_w, b_b = conv_init(group_dim, d_conv)
        c_w, c_b = conv_init(group_dim, d_conv)
        self.conv1d_weight = new_parameter(local_parts([x_w, b_w, c_w], tp_rank, tp_size), config)
        self.conv1d_bias = new_parameter(local_parts([x_b, b_b, c_b], tp_rank, tp_size), config)
        for param in (self.conv1d_weight, self.conv1d_bias):
            param.partition_sizes = [size for _, size in parts["conv1d_weight"]]
        self.dt_bias = new_parameter(rank_slice(dt_bias_init(self.nheads), tp_rank, tp_size),
                                     config)
        A = torch.empty(self.nheads).uniform_(1, 16)
        self.A_log = new_parameter(rank_slice(torch.log(A), tp_rank, tp_size), config,
                                   dtype=torch.float32)
        self.D = new_parameter(torch.ones(self.nheads_local_tp), config, dtype=torch.float32)
        self.norm = GroupedRMSNorm(self.d_inner_local_tp,
                                   self.d_inner_local_tp // self.ngroups_local_tp, NORM_EPS,
                                   config, self.tp_group)
        self.out_proj = out_projection(submodules.out_proj, self.d_inner, d_model, config,
                                       self.tp_group)

    def fused_parts(self) -> dict[str, list[tuple[str, int]]]:
        """As every plugin mixer: the fused parameters' logical parts (``mamba_fused_parts``
        gives the same for Megatron's ``MambaMixer``)."""
        return mamba_fused_parts(self)

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        refuse_non_training_inputs("M", inference_context, inference_params, packed_seq_params)
        zxbcdt, _ = self.in_proj(hidden_states)  # [l, b, d]
        y = self.mix(zxbcdt.transpose(0, 1))
        return self.out_proj(y.transpose(0, 1).contiguous())

    def mix(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """``[b, l, z|x|B|C|dt]`` -> ``[b, l, d_inner_local]``: conv, SSD scan, gate, norm."""
        batch, length, _ = zxbcdt.shape
        group_dim = self.ngroups_local_tp * self.d_state
        z, xbc, dt = torch.split(
            zxbcdt,
            [self.d_inner_local_tp, self.d_inner_local_tp + 2 * group_dim, self.nheads_local_tp],
            dim=-1,
        )
        xbc = F.silu(causal_depthwise_conv(xbc, self.conv1d_weight, self.conv1d_bias))
        x, B, C = torch.split(xbc, [self.d_inner_local_tp, group_dim, group_dim], dim=-1)
        y, _ = ssd_scan_reference(
            x.reshape(batch, length, self.nheads_local_tp, self.headdim),
            F.softplus(dt.float() + self.dt_bias.float()),
            -torch.exp(self.A_log.float()),
            B.reshape(batch, length, self.ngroups_local_tp, self.d_state),
            C.reshape(batch, length, self.ngroups_local_tp, self.d_state),
            self.chunk_size,
            D=self.D,
        )
        y = y.reshape(batch, length, self.d_inner_local_tp) * F.silu(z.float())
        return self.norm(y).to(zxbcdt.dtype)

    def plasticity_parts(self) -> list[tuple]:
        """The logical parts of the projections, for plasticity tools (``plasticity.parts``):
        ``(name, parameter, local row ranges or None, tensor-parallel dim)``. ``in_proj`` is
        column parallel with the local rows z | x | B | C | dt; ``out_proj`` is row parallel."""
        sizes = dict(mamba_fused_parts(self)["in_proj.weight"])
        return [*consecutive_parts(self.in_proj.weight, sizes, tp_dim=0),
                ("out", self.out_proj.weight, None, 1)]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's ``MambaMixer`` checkpoint layout, by calling its own method: it reads
        only the parameters and size attributes this class shares with it."""
        return MambaMixer.sharded_state_dict(self, prefix, sharded_offsets, metadata)

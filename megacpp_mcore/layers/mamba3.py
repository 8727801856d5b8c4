"""Letter M's Mamba-3 variant (SISO): mamba-ssm's Triton scan on GPU, the PyTorch reference
on CPU, one module and one parameter layout.

Parameters carry mamba-ssm 2.3.2 ``Mamba3``'s names and shapes: ``in_proj`` = z | x | B | C |
dd_dt | dd_A | trap | angles, ``dt_bias [h]``, ``B_bias``/``C_bias [h, rank, N]`` (fp32),
``B_norm.weight``/``C_norm.weight [N]``, ``D [h]`` (fp32), ``out_proj``. Per head::

    DT = softplus(dd_dt + dt_bias)      ADT = -max(softplus(dd_A), A_floor) * DT
    y = mamba3_siso(Q=C_norm(C), K=B_norm(B), V=x, ADT, DT, Trap=trap, biases, angles, D, Z=z)

with the scan of ``ops.mamba3.reference`` (path ``reference``) or mamba-ssm's
``mamba3_siso_combined`` (path ``fused``). Not built: the optional output norm of mamba-ssm's
module (``is_outproj_norm``, off there by default), MIMO (refused by the spec builder: TileLang
0.1.15 fails to compile it on H200), inference caches. Tensor parallel size 1 only (see
``settings.sizes``: the angle rows and B/C norms are shared by every head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.transformer.module import MegatronModule

from megacpp_mcore.layers.mixer_common import (
    GroupedRMSNorm,
    dt_bias_init,
    in_projection,
    mixer_sharded_state_dict,
    new_parameter,
    out_projection,
    refuse_non_training_inputs,
)
from megacpp_mcore.ops.mamba3.reference import mamba3_siso_reference

PATHS = ("fused", "reference")
NORM_EPS = 1e-5
A_FLOOR = 1e-4


class Mamba3Mixer(MegatronModule):
    """Mamba-3 SISO mixer over ``[s, b, hidden]``; returns ``(out, out_bias)``."""

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
        chunk_size: int = 64,
        rope_fraction: float = 0.5,
    ):
        super().__init__(config)
        if path not in PATHS:
            raise ValueError(f"Mamba3Mixer path {path!r}; accepted: {', '.join(PATHS)}")
        self.tp_group = pg_collection.tp
        if self.tp_group.size() != 1 or pg_collection.cp.size() != 1:
            raise ValueError("the Mamba-3 mixer runs at tensor and context parallel size 1 "
                             "(see megacpp_mcore.settings.sizes)")
        self.path, self.layer_number, self.chunk_size = path, layer_number, chunk_size
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        self.nheads = config.mamba_num_heads or 2 * d_model // self.headdim
        self.d_inner = self.nheads * self.headdim
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba heads ({self.nheads}) must divide by groups ({self.ngroups})")
        self.num_rope_angles = int(self.d_state * rope_fraction) // 2
        parts = self.fused_parts()["in_proj.weight"]
        self.in_proj = in_projection(submodules.in_proj, d_model, [n for _, n in parts], config,
                                     self.tp_group)
        self.dt_bias = new_parameter(dt_bias_init(self.nheads), config, dtype=torch.float32)
        for bias in ("B_bias", "C_bias"):
            setattr(self, bias, new_parameter(torch.ones(self.nheads, 1, self.d_state), config,
                                              dtype=torch.float32))
        for norm in ("B_norm", "C_norm"):
            setattr(self, norm, GroupedRMSNorm(self.d_state, self.d_state, NORM_EPS, config,
                                               self.tp_group, tp_split=False))
        self.D = new_parameter(torch.ones(self.nheads), config, dtype=torch.float32)
        self.out_proj = out_projection(submodules.out_proj, self.d_inner, d_model, config,
                                       self.tp_group)

    def fused_parts(self) -> dict[str, list[tuple[str, int]]]:
        """The logical parts of ``in_proj`` (rows, dim 0), in mamba-ssm's order."""
        group = self.ngroups * self.d_state
        return {"in_proj.weight": [
            ("z", self.d_inner), ("x", self.d_inner), ("B", group), ("C", group),
            ("dd_dt", self.nheads), ("dd_A", self.nheads), ("trap", self.nheads),
            ("angles", self.num_rope_angles)]}

    def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                packed_seq_params=None):
        refuse_non_training_inputs("M (Mamba-3)", inference_context, inference_params,
                                   packed_seq_params)
        projected, _ = self.in_proj(hidden_states)  # [l, b, d]
        y = self.mix(projected.transpose(0, 1))
        return self.out_proj(y.transpose(0, 1).contiguous())

    def mix(self, projected: torch.Tensor) -> torch.Tensor:
        """``[b, l, in_proj parts]`` -> ``[b, l, d_inner]``."""
        batch, length, _ = projected.shape
        sizes = [n for _, n in self.fused_parts()["in_proj.weight"]]
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(projected, sizes, dim=-1)
        heads, groups = (batch, length, self.nheads, self.headdim), (
            batch, length, self.ngroups, self.d_state)
        A = torch.clamp(-F.softplus(dd_A.float()), max=-A_FLOOR)
        DT = F.softplus(dd_dt.float() + self.dt_bias.float())
        scan = dict(
            Q=self.C_norm(C.reshape(groups)).to(x.dtype),
            K=self.B_norm(B.reshape(groups)).to(x.dtype),
            V=x.reshape(heads),
            ADT=(A * DT).transpose(1, 2).contiguous(),
            DT=DT.transpose(1, 2).contiguous(),
            Trap=trap.transpose(1, 2).contiguous(),
            Q_bias=self.C_bias.squeeze(1),
            K_bias=self.B_bias.squeeze(1),
            Angles=angles.float().unsqueeze(2).expand(-1, -1, self.nheads, -1),
            D=self.D,
            Z=z.reshape(heads),
            chunk_size=self.chunk_size,
        )
        if self.path == "fused":
            from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

            y = mamba3_siso_combined(**scan)
        else:
            y = mamba3_siso_reference(**scan)
        return y.reshape(batch, length, self.d_inner).to(projected.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return mixer_sharded_state_dict(self, prefix, sharded_offsets, metadata,
                                        ("dt_bias", "B_bias", "C_bias", "D"),
                                        fused_parts=self.fused_parts())

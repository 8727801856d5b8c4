"""Pieces shared by the project's own mixers (M and R): tensor-parallel-invariant
initialisation, the causal depthwise convolution, the per-group RMS norm and checkpoint
sharding (per-head parameters split over TP, fused parameters saved as their logical parts).

Initialisation draws every parameter at its *full* (unsharded) size from the CPU generator
and keeps this rank's slice, as Megatron's ``use_cpu_initialization`` does for its linears.
The seeded model is then the same function at any tensor-parallel size, which is what the
TP tests check, and nothing depends on the CUDA RNG tracker (absent on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)


def param_device(config) -> torch.device:
    """Where parameters are created: CPU for ``use_cpu_initialization`` or no CUDA."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def rank_slice(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous share of ``full`` along dim 0."""
    return full.chunk(size, dim=0)[rank]


def local_parts(parts: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """Concatenate this rank's share of each logical part (e.g. x | B | C of a conv).

    Megatron's fused projections are laid out per rank as [part1_local | part2_local | ...],
    so a parameter spanning several parts is sliced part by part, never as one block.
    """
    return torch.cat([rank_slice(part, rank, size) for part in parts], dim=0)


def new_parameter(local: torch.Tensor, config, dtype: torch.dtype | None = None):
    """A tensor-parallel parameter (split along dim 0) on the configured device."""
    param = torch.nn.Parameter(
        local.to(device=param_device(config), dtype=dtype or config.params_dtype).contiguous()
    )
    param.tensor_model_parallel = True
    param.partition_dim = 0
    param.partition_stride = 1
    return param


def consecutive_parts(weight, local_sizes: dict[str, int], tp_dim: int) -> list[tuple]:
    """Plasticity part declarations of a fused projection laid out per rank as
    [part1_local | part2_local | ...]: ``(name, weight, ((start, stop),), tp_dim)`` each."""
    parts, start = [], 0
    for name, size in local_sizes.items():
        parts.append((name, weight, ((start, start + size),), tp_dim))
        start += size
    if start != weight.shape[0]:
        raise ValueError(f"declared parts ({local_sizes}) cover {start} rows of a fused "
                         f"projection with {weight.shape[0]}")
    return parts


def init_fused_projection(linear, part_sizes: list[int], config, rank: int, size: int) -> None:
    """Re-draw a column-parallel projection that packs several parts (q | k | v | ...).

    Megatron's CPU initialisation draws the full weight and gives each rank a contiguous
    block of rows, but a fused projection is laid out per rank as [part1_local | part2_local
    | ...]. Drawing the full weight in logical order and slicing part by part keeps the model
    the same function at every tensor-parallel size. Only for ``use_cpu_initialization``
    (GPU initialisation in Megatron is per rank anyway).
    """
    if not (config.use_cpu_initialization and config.perform_initialization):
        return
    full = torch.empty(sum(part_sizes), linear.weight.shape[1], dtype=torch.float32)
    config.init_method(full)
    local = local_parts(list(full.split(part_sizes)), rank, size)
    with torch.no_grad():
        linear.weight.copy_(local)


def linear_default_init(linear, part_sizes: list[int] | None, config, rank: int,
                        size: int) -> None:
    """Re-draw a parallel linear with torch ``nn.Linear``'s default init (kaiming-uniform,
    a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))) at its full size, keeping this rank's
    share: part by part along dim 0 for a column-parallel fused projection
    (``part_sizes``), along dim 1 for a row-parallel one (``part_sizes`` None)."""
    if not config.perform_initialization:
        return
    local = linear.weight
    rows = sum(part_sizes) if part_sizes is not None else local.shape[0]
    cols = local.shape[1] if part_sizes is not None else local.shape[1] * size
    full = torch.empty(rows, cols, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))
    if part_sizes is not None:
        share = local_parts(list(full.split(part_sizes)), rank, size)
    else:
        share = full.chunk(size, dim=1)[rank]
    with torch.no_grad():
        local.copy_(share)


def in_projection(spec, d_model: int, part_sizes: list[int], config, tp_group):
    """The mixer's column-parallel input projection packing ``part_sizes`` (per rank
    ``[part1_local | part2_local | ...]``), initialised part by part (see above)."""
    projection = build_module(
        spec, d_model, sum(part_sizes), config=config, init_method=config.init_method,
        gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
        tp_comm_buffer_name="fc1", tp_group=tp_group,
    )
    init_fused_projection(projection, part_sizes, config, tp_group.rank(), tp_group.size())
    return projection


def out_projection(spec, inner: int, d_model: int, config, tp_group):
    """The mixer's row-parallel output projection (bias returned separately, as Megatron's)."""
    return build_module(
        spec, inner, d_model, config=config, init_method=config.output_layer_init_method,
        bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False,
        tp_comm_buffer_name="fc2", tp_group=tp_group,
    )


def refuse_non_training_inputs(mixer: str, inference_context, inference_params,
                               packed_seq_params) -> None:
    """The project's mixers train on whole, unpacked sequences; say so instead of guessing."""
    if inference_context is not None or inference_params is not None:
        raise NotImplementedError(f"the {mixer} mixer has no inference cache yet (training only)")
    if packed_seq_params is not None:
        raise NotImplementedError(f"the {mixer} mixer does not support packed sequences yet")


def conv_init(channels: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's default Conv1d initialisation for a depthwise kernel (as Megatron's Mamba)."""
    bound = 1.0 / math.sqrt(width)
    weight = torch.empty(channels, 1, width).uniform_(-bound, bound)
    bias = torch.empty(channels).uniform_(-bound, bound)
    return weight, bias


def dt_bias_init(heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4):
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's initialisation)."""
    log_dt = torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """``x [b, l, c]`` convolved causally per channel with ``weight [c, 1, w]``."""
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight, bias, groups=x.shape[-1])
    return out.transpose(1, 2)


def grouped_rms_norm(x: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float):
    """RMS norm over consecutive groups of ``group_size`` channels, computed in float32."""
    shape = x.shape
    grouped = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return grouped.reshape(shape) * weight.float()


class GroupedRMSNorm(torch.nn.Module):
    """RMS norm over groups of channels of a tensor-parallel mixer's inner width.

    Its weight is this rank's slice (``weight``, as Megatron's ``ExtendedRMSNorm`` of the
    Mamba mixer), and it is saved split along dim 0 across tensor-parallel ranks; with
    ``tp_split=False`` the weight is one per group position, the same on every rank.
    """

    def __init__(self, local_size: int, group_size: int, eps: float, config, tp_group,
                 tp_split: bool = True):
        super().__init__()
        self.group_size, self.eps, self.tp_group = group_size, eps, tp_group
        self.weight = new_parameter(torch.ones(local_size), config)
        self.tp_axes = {"weight": 0} if tp_split else {}
        if not tp_split:  # one weight shared by every rank's channels
            self.weight.tensor_model_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_rms_norm(x, self.weight, self.group_size, self.eps)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, self.tp_axes, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


def split_fused(sharded: dict, prefix: str, fused_parts: dict) -> dict:
    """Save each fused parameter as its logical parts (``in_proj.weight.q``, ...).

    A fused tensor-parallel parameter is laid out per rank as [part1_local | part2_local |
    ...]; saved whole, a checkpoint taken at one TP size would be scrambled at another.
    Saved as parts (Megatron's own splitter, as its Mamba mixer does), each part is an
    ordinary TP-split tensor. ``fused_parts``: parameter name -> [(part, rows on this rank)].
    """
    for name, parts in fused_parts.items():
        sizes, names = [size for _, size in parts], [part for part, _ in parts]
        sharded[prefix + name] = _split_tensor_factory(sharded[prefix + name], sizes, names, 0)
    return sharded


def mixer_sharded_state_dict(module, prefix, sharded_offsets, metadata, tp_params,
                             fused_parts: dict | None = None):
    """Checkpoint sharding for a mixer: ``tp_params`` are split along dim 0 across TP ranks;
    submodules (the TP linears) shard themselves; ``fused_parts`` are saved as parts."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    state: dict = {}
    module._save_to_state_dict(state, "", keep_vars=True)
    sharded = make_sharded_tensors_for_checkpoint(
        state,
        prefix,
        tensor_parallel_layers_axis_map=dict.fromkeys(tp_params, 0),
        sharded_offsets=sharded_offsets,
        tp_group=module.tp_group,
        dp_cp_group=metadata["dp_cp_group"],
    )
    for name, child in module.named_children():
        sharded.update(
            sharded_state_dict_default(
                child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=module.tp_group
            )
        )
    return split_fused(sharded, prefix, fused_parts or {})

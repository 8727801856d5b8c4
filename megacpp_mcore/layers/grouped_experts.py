"""Expert GEMMs as one torch grouped GEMM (``model.moe.expert_gemm: torch``).

Why: Megatron's TE experts (``TEGroupedLinear``) issue one cuBLAS GEMM per expert and pay
host time for every token count an expert has not seen before (algorithm selection on
data-dependent shapes; ../shared/REFERENCES.md, Performance: ~58 ms of CPU per step of the
benchmark model, the largest host cost of an MoE step). ``torch.nn.functional.grouped_mm``
runs all experts of a projection in one CUTLASS kernel whose group boundaries are a device
tensor, so a new token split costs no host work.

The modules here are Megatron's own ``TEColumnParallelGroupedLinear`` /
``TERowParallelGroupedLinear`` with only ``forward`` replaced: parameters (``weight{i}``,
one per local expert), their parallel attributes, initialisation, sharded checkpoints and
the plasticity parts stay Megatron's, so a checkpoint moves between ``te`` and ``torch``
experts unchanged. Same maths: each expert's rows are multiplied by its own weight with fp32
accumulation (tested against TE's experts on the GPU, ``tests/gpu/test_grouped_experts_gpu.py``).

What it does not do (refused at construction, with the reason): FP8/FP4, biases, delayed
weight gradients, TE's single grouped weight or op fuser, parameters other than bf16, and
GPUs before Hopper (torch's grouped GEMM kernel is SM90+).
"""

from __future__ import annotations

import functools
import itertools

import torch

from megacpp_mcore.errors import SpecError


def have_grouped_mm() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm():
    return getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def group_offsets(m_splits: list[int], device: torch.device) -> torch.Tensor:
    """End row of each group (int32, on ``device``): grouped_mm's ``offs``."""
    return torch.tensor(list(itertools.accumulate(m_splits)), dtype=torch.int32, device=device)


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], m_splits: list[int]
                   ) -> torch.Tensor:
    """``x`` rows split by ``m_splits``, group ``g`` times ``weights[g].T`` (each [out, in]).

    One grouped GEMM over the stacked weights; autograd gives the input and per-expert
    weight gradients (the stack's backward hands each expert its slice).
    """
    if len(m_splits) != len(weights):
        raise ValueError(f"{len(m_splits)} groups of rows for {len(weights)} weights")
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] != sum(m_splits):
        raise ValueError(f"{rows.shape[0]} rows, but the groups add up to {sum(m_splits)}")
    stacked = torch.stack(weights)  # [groups, out, in]
    if rows.shape[0] == 0:
        # nothing routed here: an empty product through the stack still gives every expert
        # a (zero) gradient, which Megatron's DDP waits for before it reduces a bucket
        out = rows @ stacked[0].t()
    else:
        out = _grouped_mm()(rows, stacked.transpose(1, 2), offs=group_offsets(m_splits, x.device))
    return out.reshape(*shape[:-1], out.shape[-1])


def grouped_linear_reference(x: torch.Tensor, weights: list[torch.Tensor],
                             m_splits: list[int]) -> torch.Tensor:
    """The naive form: one matmul per group (for tests)."""
    rows = x.reshape(-1, x.shape[-1])
    parts = [chunk @ w.t() for chunk, w in zip(torch.split(rows, m_splits), weights, strict=True)]
    out = torch.cat(parts) if parts else rows @ weights[0].t()
    return out.reshape(*x.shape[:-1], out.shape[-1])


def grouped_gemm_problem(config, input_size: int, output_size: int, bias: bool,
                         delay_wgrad: bool) -> str | None:
    """Why torch's grouped GEMM cannot stand in for TE's here, or None."""
    if not have_grouped_mm():
        return f"torch {torch.__version__} has no grouped_mm (torch >= 2.9 has)"
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return "FP8/FP4 training runs TE's quantised experts"
    if bias:
        return "expert biases (model add_bias_linear) are not supported"
    if delay_wgrad:
        return "delayed weight gradients (delay_wgrad_compute) are TE's"
    if getattr(config, "moe_single_grouped_weight", False):
        return "moe_single_grouped_weight keeps TE's single grouped parameter"
    if getattr(config, "use_transformer_engine_op_fuser", False):
        return "use_transformer_engine_op_fuser runs TE's fused expert MLP instead"
    if config.params_dtype != torch.bfloat16:
        return f"parameters are {config.params_dtype}; the grouped GEMM kernel runs bf16"
    if input_size % 8 or output_size % 8:
        return (f"expert GEMM {input_size} -> {output_size}: both sizes must be multiples of "
                "8 (the kernel's 16-byte row alignment)")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return "torch's grouped GEMM kernel needs a Hopper-or-newer GPU (SM90+)"
    return None


class _TorchGroupedForward:
    """Mixin over a Megatron TE grouped linear: same parameters, forward by grouped_mm."""

    def _check_torch_grouped(self, config, bias: bool) -> None:
        problem = grouped_gemm_problem(config, self.in_features, self.out_features, bias,
                                       self.delay_wgrad_compute)
        if problem:
            raise SpecError(f"model.moe.expert_gemm torch: {problem}; use expert_gemm te")

    def forward(self, x: torch.Tensor, m_splits):
        if isinstance(m_splits, torch.Tensor):
            m_splits = m_splits.tolist()
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        return grouped_linear(x, weights, list(m_splits)), None


@functools.cache
def torch_grouped_linears() -> tuple[type, type]:
    """(column, row) expert linears for ``TEGroupedMLP``'s fc1 and fc2 (needs TE)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelGroupedLinear,
        TERowParallelGroupedLinear,
    )

    def subclass(base: type, name: str) -> type:
        def __init__(self, *args, config, bias, **kwargs):
            base.__init__(self, *args, config=config, bias=bias, **kwargs)
            self._check_torch_grouped(config, bias)

        return type(name, (_TorchGroupedForward, base),
                    {"__init__": __init__, "__module__": __name__,
                     "__doc__": f"{base.__name__} whose forward is one torch grouped GEMM."})

    return (subclass(TEColumnParallelGroupedLinear, "TorchColumnGroupedLinear"),
            subclass(TERowParallelGroupedLinear, "TorchRowGroupedLinear"))

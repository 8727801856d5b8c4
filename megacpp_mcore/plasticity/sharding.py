"""Collectives for the tools: gather a tensor-parallel matrix to whole, take a rank's chunk
back, reduce statistics, and check that every rank decided the same.

A tool never orthogonalises or scores a shard as if it were the whole tensor: it gathers
(or reduces) over every group that splits the tensor first. All functions are no-ops for a
group of one (and without ``torch.distributed``), so the same code runs in one CPU process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.distributed as dist

from megacpp_mcore.errors import PlasticityError


def size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def gather(local: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """The whole tensor from equal chunks along ``dim`` (rank order) over ``group``."""
    if dim is None or size(group) == 1:
        return local
    chunks = [torch.empty_like(local) for _ in range(size(group))]
    dist.all_gather(chunks, local.contiguous(), group=group)
    return torch.cat(chunks, dim=dim)


def chunk(full: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    """This rank's equal chunk of ``full`` along ``dim`` (inverse of :func:`gather`)."""
    if dim is None or size(group) == 1:
        return full
    return full.chunk(size(group), dim=dim)[rank(group)]


def all_reduce(tensor: torch.Tensor, group, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over ``group``; returns ``tensor``."""
    if size(group) > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_from_first(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` of the group's first rank (the owner that computed it), on every rank."""
    if size(group) > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


def expert_parallel_group():
    """Megatron's expert-model-parallel group (ranks holding different routed experts), or
    None outside an initialised Megatron parallel state."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_expert_model_parallel_group()


def total_over_experts(rows: Iterable[tuple], width: int) -> list[int]:
    """Model-wide counts for an event from ``(routed, count_1, ..., count_width)`` rows:
    counts of dense parts are the same on every rank, routed-expert counts (``routed`` true)
    cover this rank's experts only, so their sum is summed over the expert-parallel group
    (every rank of the group must call this at the same step, with or without rows)."""
    dense, expert = [0] * width, [0] * width
    for routed, *counts in rows:
        target = expert if routed else dense
        for i, count in enumerate(counts):
            target[i] += count
    group = expert_parallel_group()
    local = torch.tensor(expert, dtype=torch.float64)
    if size(group) > 1:
        on_gpu = dist.get_backend(group) == "nccl"
        local = local.cuda() if on_gpu else local
        dist.all_reduce(local, group=group)
    return [int(d + e) for d, e in zip(dense, local.tolist(), strict=True)]


def digest(*tensors: torch.Tensor) -> str:
    """A short hash of decision tensors (exact bytes), for cross-rank agreement checks."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def assert_agree(what: str, digests: list[str], groups) -> None:
    """Raise unless every rank of each group holds the same list of decision digests.

    Ranks of a group that splits or replicates the same tensors must decide identically;
    a difference means a statistic was not reduced over a group that splits it.
    """
    for group in groups:
        if size(group) == 1:
            continue
        seen: list = [None] * size(group)
        dist.all_gather_object(seen, digests, group=group)
        if any(s != seen[0] for s in seen):
            raise PlasticityError(
                f"{what}: ranks of one parallel group decided differently (decision hashes "
                f"per rank: {seen}); a statistic was not reduced over a group that splits "
                "the tensor")

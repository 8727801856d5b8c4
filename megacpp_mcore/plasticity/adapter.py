"""Where a parameter's truth lives, in each optimizer the tools run under.

An intervention must change three things together, at a point where nothing overwrites them
(the start of an iteration): the model parameter, the optimizer's fp32 main copy, and the
optimizer's moments for exactly the touched entries. Where they live:

* torch optimizers (the CPU loop's AdamW) and Megatron's ``FP32Optimizer``: the parameter
  itself is the main copy; moments in ``optimizer.state[param]``;
* Megatron's ``Float16OptimizerWithFloat16Params``: a whole fp32 ``param.main_param``;
  moments in the inner optimizer's state of that main param;
* Megatron's ``DistributedOptimizer``: a flat fp32 shard of the parameter on each
  data-parallel rank (the range ``gbuf_ranges[...]["param_map"][param]["param"]`` of the
  flattened parameter, possibly empty), with moments of the same shard
  (``_get_main_param_and_optimizer_states``); the whole parameter is rebuilt by summing the
  zero-padded shards over the optimizer's data-parallel group;
* ``ChainedOptimizer``: whichever member holds the parameter;
* FSDP2: DTensor parameters and moments; the whole tensor is ``full_tensor()``.

A :class:`Slot` hides this: ``full()`` is the fp32 parameter in its tensor-parallel-local
shape (identical on every data-parallel rank), ``write(new, reset)`` sets model param, main
param and zeroes the moments where ``reset`` is true; ``grad()``/``assemble()`` give
gradients in the main copy's own layout and make them whole only when a tool decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from megacpp_mcore.errors import PlasticityError
from megacpp_mcore.plasticity import sharding

MOMENTS = ("exp_avg", "exp_avg_sq")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _dtensor_chunk(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's local chunk of ``full`` for the DTensor ``like``'s mesh and placements."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh,
                                                          like.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    return full[index]


@dataclass(eq=False)
class Slot:
    """One model parameter and where its fp32 main copy and moments live.

    ``main``: the tensor the optimizer steps (the param, an fp32 copy, a flat shard, None when
    this data-parallel rank owns no shard); ``holder``: the torch optimizer whose ``state``
    holds the moments; ``shard``: ``(start, stop)`` of the flattened param that ``main``
    covers (DistributedOptimizer) or None; ``shard_group``: the group the shards split over.
    """

    param: torch.nn.Parameter
    main: torch.Tensor | None
    holder: Any
    shard: tuple[int, int] | None = None
    shard_group: Any = None

    @property
    def state(self) -> dict:
        if self.main is None or self.holder is None:
            return {}
        return self.holder.state.get(self.main, {})

    # ------------------------------------------------------------------ layouts

    def assemble(self, storage: torch.Tensor | None) -> torch.Tensor:
        """A tensor in ``main``'s layout made whole: fp32 in the param's (TP-local) shape."""
        if self.shard is not None:
            flat = torch.zeros(self.param.numel(), dtype=torch.float32, device=self.param.device)
            if storage is not None and self.shard[1] > self.shard[0]:
                flat[self.shard[0]:self.shard[1]] = storage.detach().float().view(-1)
            return sharding.all_reduce(flat, self.shard_group).view(self.param.shape)
        if _is_dtensor(storage):
            return storage.detach().full_tensor().float()
        return storage.detach().float().clone()

    def to_storage(self, full: torch.Tensor) -> torch.Tensor | None:
        """The part of a whole tensor that ``main``'s layout holds on this rank."""
        if self.shard is not None:
            return full.reshape(-1)[self.shard[0]:self.shard[1]]
        if _is_dtensor(self.main):
            return _dtensor_chunk(full, self.main)
        return full

    def full(self) -> torch.Tensor:
        """The fp32 truth of the parameter, whole (TP-local shape)."""
        if self.shard is None and self.main is None:
            return self.param.detach().float().clone()
        return self.assemble(self.main)

    def grad(self) -> torch.Tensor | None:
        """The step's reduced gradient in ``main``'s layout (None if there is none)."""
        if self.main is not None and self.main.grad is not None:
            return self.main.grad
        if self.shard is None:
            grad = getattr(self.param, "main_grad", None)
            return grad if grad is not None else self.param.grad
        return None

    # ------------------------------------------------------------------ writes

    @torch.no_grad()
    def write(self, new: torch.Tensor, reset: torch.Tensor | None = None) -> None:
        """Set the model param and the main copy to ``new`` (whole, fp32) and zero the
        moments where ``reset`` (bool, whole) is true; every other state entry is untouched.
        Each rank writes only what it holds."""
        local_param = self.param.to_local() if _is_dtensor(self.param) else self.param
        model_value = _dtensor_chunk(new, self.param) if _is_dtensor(self.param) else new
        local_param.copy_(model_value.to(local_param.dtype))
        if self.main is not None and self.main is not self.param:
            target = self.main.to_local() if _is_dtensor(self.main) else self.main
            target.copy_(self.to_storage(new).reshape(target.shape).to(target.dtype))
        if reset is None:
            return
        mask = self.to_storage(reset)
        for name in MOMENTS:
            moment = self.state.get(name)
            if moment is None:
                continue
            local = moment.to_local() if _is_dtensor(moment) else moment
            local.masked_fill_(mask.reshape(local.shape).to(local.device), 0)


class OptimizerAdapter:
    """Finds the :class:`Slot` of a model parameter in a torch or Megatron optimizer."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._slots: dict[int, Slot] = {}
        for member in _members(optimizer):
            self._index(member)

    def slot(self, param: torch.nn.Parameter) -> Slot:
        found = self._slots.get(id(param))
        if found is None:
            raise PlasticityError(
                f"parameter of shape {tuple(param.shape)} is not held by the optimizer "
                f"({type(self.optimizer).__name__}); plasticity acts only on trained params")
        return found

    def _index(self, member: Any) -> None:
        kind = type(member).__name__
        if kind == "DistributedOptimizer":
            self._index_distributed(member)
        elif kind == "Float16OptimizerWithFloat16Params":
            for model_group, main_group in zip(member.float16_groups,
                                               member.fp32_from_float16_groups, strict=True):
                for param, main in zip(model_group, main_group, strict=True):
                    self._slots[id(param)] = Slot(param, main, member.optimizer)
            for group in member.fp32_from_fp32_groups:
                for param in group:
                    self._slots[id(param)] = Slot(param, param, member.optimizer)
        elif kind == "FP32Optimizer":
            self._index_torch(member.optimizer)
        elif isinstance(member, torch.optim.Optimizer):
            self._index_torch(member)
        else:
            raise PlasticityError(
                f"plasticity does not know the optimizer {kind}; accepted: torch optimizers, "
                "Megatron's FP32Optimizer, Float16OptimizerWithFloat16Params, "
                "DistributedOptimizer and ChainedOptimizer of them")

    def _index_torch(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:  # a stub optimizer of a rank without parameters
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                self._slots[id(param)] = Slot(param, param, optimizer)

    def _index_distributed(self, member: Any) -> None:
        if getattr(member.config, "use_precision_aware_optimizer", False):
            raise PlasticityError(
                "plasticity under --use-precision-aware-optimizer is not supported (its "
                "moments are kept scaled inside the fused optimizer); turn it off")
        group = member.data_parallel_group
        for buffer in member.buffers:
            for param in buffer.param_index_map:
                self._slots[id(param)] = distributed_slot(member, param, group)


def distributed_slot(member: Any, param: torch.nn.Parameter, group: Any) -> Slot:
    """The slot of ``param`` in a ``DistributedOptimizer``: its flat shard range on this
    data-parallel rank (empty when the rank owns none of it) and the shard main param."""
    where = member.model_param_gbuf_map.get(param)
    if where is None:
        return Slot(param, None, member.optimizer, shard=(0, 0), shard_group=group)
    gbuf_index, dtype, bucket_index = where
    ranges = member.gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"][param]["param"]
    group_index, group_order = member.model_param_group_index_map[param]
    main = member.optimizer.param_groups[group_index]["params"][group_order]
    return Slot(param, main, member.optimizer, shard=(ranges.start, ranges.end),
                shard_group=group)


def _members(optimizer: Any) -> Iterable[Any]:
    if hasattr(optimizer, "chained_optimizers"):
        return list(optimizer.chained_optimizers)
    return [optimizer]


def inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers that step (one per Megatron member, in step order)."""
    out = []
    for member in _members(optimizer):
        inner = member if isinstance(member, torch.optim.Optimizer) else getattr(
            member, "optimizer", None)
        if inner is not None:
            out.append(inner)
    return out


def param_groups(optimizer: Any) -> list[dict]:
    """Every param group whose ``lr`` the step uses (for a learning-rate re-warm-up)."""
    return [g for inner in inner_optimizers(optimizer) for g in inner.param_groups]

"""DASH: direction-aware shrinking of weight rows.

Shin et al., NeurIPS 2024 (arXiv 2410.23495). Per output row ``W_i *= clamp(cos(W_i, -G_i),
lam, 1)`` with ``G`` an exponential moving average of the gradient: rows aligned with the
descent direction keep their size, rows whose gradient points along the row itself shrink the
most (by ``lam`` at worst). A row with a zero gradient EMA (or zero weight) is left as is.

The EMA is ``G <- (1 - alpha) G + alpha g`` after every optimizer step (``alpha`` weighs the
newest gradient), kept only for the targets and in the optimizer's own layout (under the
distributed optimizer: the rank's flat shard), so it costs one fp32 element per target
element held on the rank (4 bytes x target params / data-parallel size) and one fused
``lerp_`` per target per step; it is made whole only at a DASH step. Row statistics of a
row-parallel weight are summed over the tensor-parallel group before the scale is decided,
so every rank applies the same scale to its own shard. Optimizer moments are kept (as in the
paper); the model param and the fp32 main copy are scaled together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from megacpp_mcore.plasticity import sharding
from megacpp_mcore.plasticity.adapter import OptimizerAdapter
from megacpp_mcore.plasticity.parts import (
    assert_decisions_agree,
    by_param,
    fire_targets,
    param_names,
)
from megacpp_mcore.train.hooks import HookContext, TrainingHook

EPS = 1e-30


def _scale_from(dot: torch.Tensor, wn: torch.Tensor, gn: torch.Tensor, lam: float):
    norms = torch.sqrt(wn * gn)
    cos = dot / norms.clamp_min(EPS)
    return torch.where(norms > 0, cos.clamp(lam, 1.0), torch.ones_like(cos))


def shrink_rows(weight: torch.Tensor, grad_ema: torch.Tensor, lam: float = 0.3):
    """``(shrunk weight, per-row scale)`` for a whole ``[rows, cols]`` matrix (fp32)."""
    w, g = weight.float(), grad_ema.float()
    scale = _scale_from((w * -g).sum(1), (w * w).sum(1), (g * g).sum(1), lam)
    return w * scale[:, None], scale


def shrink_rows_reference(weight: torch.Tensor, grad_ema: torch.Tensor, lam: float = 0.3):
    """Naive oracle: the formula row by row in float64."""
    w, g = weight.double(), grad_ema.double()
    out, scales = w.clone(), []
    for i in range(w.shape[0]):
        denominator = torch.linalg.norm(w[i]) * torch.linalg.norm(g[i])
        s = 1.0 if denominator == 0 else min(1.0, max(lam, float(torch.dot(w[i], -g[i])
                                                                / denominator)))
        out[i] *= s
        scales.append(s)
    return out, torch.tensor(scales, dtype=torch.float64)


def shrink_rows_sharded(weight: torch.Tensor, grad_ema: torch.Tensor, lam: float,
                        tp_dim: int | None, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shrink_rows` on this rank's tensor-parallel shard: a row split over the group
    (``tp_dim == 1``) has its dot product and norms summed over the group first."""
    w, g = weight.float(), grad_ema.float()
    stats = torch.stack([(w * -g).sum(1), (w * w).sum(1), (g * g).sum(1)])
    if tp_dim == 1:
        sharding.all_reduce(stats, tp_group)
    scale = _scale_from(stats[0], stats[1], stats[2], lam)
    return w * scale[:, None], scale


def _target_rows(parts, n_rows: int, device) -> torch.Tensor | None:
    """Mask of a parameter's local rows that belong to its target parts (None: all)."""
    if any(part.rows is None for part in parts):
        return None
    mask = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for part in parts:
        mask[part.index().to(device)] = True
    return None if bool(mask.all()) else mask


class DashHook(TrainingHook):
    """Gradient EMA in ``after_step``; shrink at ``start``, ``start + every``, ... (before
    that step's first micro-batch)."""

    name = "dash"
    goodput_bucket = "plasticity"

    def __init__(self, every: int, start: int = 1, lam: float = 0.3, alpha: float = 0.3,
                 mode: str = "all") -> None:
        self.every, self.start, self.lam, self.alpha, self.mode = every, start, lam, alpha, mode
        self.ema: dict[str, torch.Tensor] = {}
        self._targets: list[tuple[torch.nn.Parameter, Any]] = []
        self._names: dict[int, str] = {}
        self._adapter: OptimizerAdapter | None = None
        self._events: list[dict[str, Any]] = []

    def install(self, model_chunks, context: HookContext) -> None:
        parts = [p for p in fire_targets(model_chunks, self.mode) if p.param.ndim == 2]
        self._parts = parts
        self._targets = list(by_param(parts))  # (param, its target parts)
        self._names = param_names(model_chunks)

    def _adapter_for(self, optimizer) -> OptimizerAdapter:
        if self._adapter is None or self._adapter.optimizer is not optimizer:
            self._adapter = OptimizerAdapter(optimizer)
        return self._adapter

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def after_step(self, step, model_chunks, optimizer) -> None:
        adapter = self._adapter_for(optimizer)
        for param, _ in self._targets:
            grad = adapter.slot(param).grad()
            if grad is None:
                continue
            name = self._names[id(param)]
            ema = self.ema.get(name)
            if ema is None:
                self.ema[name] = grad.detach().float().clone()
            else:
                ema.lerp_(grad.detach().float(), self.alpha)

    @torch.no_grad()
    def before_step(self, step, model_chunks, optimizer) -> None:
        if not self.due(step) or not self.ema:
            return
        started = time.perf_counter()
        adapter = self._adapter_for(optimizer)
        digests, counts = [], []  # counts: (routed expert?, shrunk rows, rows)
        for param, parts in self._targets:
            part = parts[0]  # the parts of one parameter share its tensor-parallel split
            slot = adapter.slot(param)
            ema = self.ema.get(self._names[id(param)])
            if ema is None and slot.shard is None:
                continue  # no gradient seen yet (an unused parameter)
            grad = slot.assemble(ema)
            full = slot.full()
            new, scale = shrink_rows_sharded(full, grad, self.lam, part.tp_dim, part.tp_group)
            targeted = _target_rows(parts, full.shape[0], full.device)
            if targeted is not None:  # rows of parts DASH leaves (gates such as dt): scale 1
                scale = torch.where(targeted, scale, torch.ones_like(scale))
                new = torch.where(targeted[:, None], new, full.float())
            slot.write(new)
            # the whole layer's decision: a column-parallel weight's rows are split over TP
            whole = sharding.gather(scale, 0 if part.tp_dim == 0 else None, part.tp_group)
            digests.append((part, sharding.digest(whole)))
            counts.append((part.expert is not None, int((whole < 1).sum()),
                           sum(p.global_shape()[0] for p in parts)))
        assert_decisions_agree(f"DASH at step {step}", digests)
        shrunk, rows = sharding.total_over_experts(counts, width=2)
        self._events.append({"step": step, "kind": "dash", "touched": shrunk,
                             "seconds": time.perf_counter() - started, "rows": rows,
                             "params": len(self._targets), "lam": self.lam})

    def events(self):
        out, self._events = self._events, []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = {self._names[id(p)]: p.device for p, _ in self._targets}
        self.ema = {k: v.to(device.get(k, v.device)) for k, v in state.get("ema", {}).items()}


__all__: Sequence[str] = ("DashHook", "shrink_rows", "shrink_rows_reference",
                          "shrink_rows_sharded")

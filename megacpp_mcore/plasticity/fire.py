"""FIRE: replace a weight matrix by the nearest isometry, scaled by sqrt(d_out / d_in).

Han et al., ICLR 2026 (arXiv 2602.08040). ``exact`` is the polar factor ``U V^T`` of the SVD
(singular values become exactly the scale); ``paper`` is the reference LM code's recipe,
Frobenius-normalise then five cubic Newton-Schulz steps ``X = 1.5 X - 0.5 X X^T X``, which at
LLM widths stays far from an isometry (kept for comparison). The scale uses the GLOBAL shape
of the logical part: a tensor-parallel part is gathered to whole, computed once on the
group's first rank, broadcast, and each rank writes back only its own chunk, so a shard is
never orthogonalised as if it were the matrix. Optimizer moments are zeroed for exactly the
touched rows (the reference code clears all state; untouched entries here stay
bit-identical). An optional learning-rate re-warm-up follows a FIRE step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from megacpp_mcore.errors import PlasticityError
from megacpp_mcore.plasticity import sharding
from megacpp_mcore.plasticity.adapter import OptimizerAdapter, param_groups
from megacpp_mcore.plasticity.parts import (
    Part,
    assert_decisions_agree,
    by_param,
    fire_targets,
    walk_parts,
)
from megacpp_mcore.settings.config import SEQ_LENGTH_CHANGE
from megacpp_mcore.train.hooks import HookContext, TrainingHook

METHODS = ("exact", "paper")
PAPER_STEPS = 5


def _scale(weight: torch.Tensor) -> float:
    return math.sqrt(weight.shape[-2] / weight.shape[-1])


def isometry(weight: torch.Tensor, method: str = "exact") -> torch.Tensor:
    """The (approximate) nearest isometry of ``weight`` (``[..., d_out, d_in]``, batched over
    leading dims), times sqrt(d_out / d_in); computed in fp32, returned in fp32.

    ``exact``: the polar factor ``U V^T`` of an fp32 SVD, then one Newton-Schulz polish step
    in fp64 (``X (3 I - X^T X) / 2``, quadratic near an isometry): the fp32 SVD alone left
    singular values 2-4e-3 off the scale at 4096 wide on an H200; the polish squares that."""
    if method not in METHODS:
        raise ValueError(f"FIRE method {method!r}; accepted: {', '.join(METHODS)}")
    w = weight.float()
    if method == "exact":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        x = u.double() @ vh.double()
        x = 1.5 * x - 0.5 * x @ (x.transpose(-2, -1) @ x)
        return x.float() * _scale(w)
    x = w / w.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    for _ in range(PAPER_STEPS):
        x = 1.5 * x - 0.5 * x @ (x.transpose(-2, -1) @ x)
    return x * _scale(w)


def isometry_reference(weight: torch.Tensor, method: str = "exact") -> torch.Tensor:
    """Naive float64 oracle: ``W (W^T W)^(-1/2)`` by eigendecomposition (exact), or the
    Newton-Schulz loop written out per step (paper)."""
    w = weight.double()
    if method == "exact":
        wide = w.shape[0] < w.shape[1]
        a = w.T if wide else w
        evals, evecs = torch.linalg.eigh(a.T @ a)
        inv_sqrt = evecs @ torch.diag(evals.clamp_min(1e-300).rsqrt()) @ evecs.T
        polar = a @ inv_sqrt
        return (polar.T if wide else polar) * _scale(w)
    x = w / torch.sqrt((w * w).sum())
    for _ in range(PAPER_STEPS):
        gram = x.T @ x
        x = 1.5 * x - 0.5 * (x @ gram)
    return x * _scale(w)


@torch.no_grad()
def fire_parts(parts: Sequence[Part], adapter: OptimizerAdapter, method: str = "exact",
               ) -> list[str]:
    """FIRE every part in place (model param, main param, moments of its rows); returns
    ``(part, digest of what was written)`` pairs for the cross-rank agreement check."""
    digests = []  # (part, digest of the whole new part)
    for param, its_parts in by_param(parts):
        slot = adapter.slot(param)
        full = slot.full()
        reset = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
        for part in its_parts:
            index = part.index()
            local = full if index is None else full[index]
            whole = sharding.gather(local, part.tp_dim, part.tp_group)
            new = isometry(whole, method) if sharding.rank(part.tp_group) == 0 else \
                torch.empty_like(whole)
            new = sharding.broadcast_from_first(new.contiguous(), part.tp_group)
            mine = sharding.chunk(new, part.tp_dim, part.tp_group)
            if index is None:
                full.copy_(mine)
                reset.fill_(True)
            else:
                full[index] = mine
                reset[index] = True
            digests.append((part, sharding.digest(new)))
        slot.write(full, reset)
    return digests


class FireHook(TrainingHook):
    """FIRE at the listed steps (before their first micro-batch), then an optional linear
    learning-rate re-warm-up over ``rewarmup_iters`` steps (0: none)."""

    name = "fire"
    goodput_bucket = "plasticity"

    def __init__(self, steps: Sequence[int | str], mode: str = "all", method: str = "exact",
                 rewarmup_iters: int = 0, phases: dict[str, int | None] | None = None) -> None:
        """``steps``: step numbers or phase names; ``phases``: the step each name stands for
        (``seq_length_change`` is decided at the first step, from the loaded iteration and
        the sequence length the saved state records)."""
        phases = dict(phases or {})
        self._on_new_length = SEQ_LENGTH_CHANGE in steps
        unknown = [s for s in steps if isinstance(s, str) and s != SEQ_LENGTH_CHANGE
                   and phases.get(s) is None]
        if unknown:
            raise PlasticityError(f"plasticity.fire.steps names {unknown}: this run has no "
                                  f"such phase boundary (known here: {phases})")
        self.steps = sorted({phases[s] if isinstance(s, str) else s for s in steps
                             if s != SEQ_LENGTH_CHANGE})
        self.mode, self.method, self.rewarmup_iters = mode, method, rewarmup_iters
        self._events: list[dict[str, Any]] = []
        self._parts: list[Part] = []
        self._skipped: list[str] = []
        self._adapter: OptimizerAdapter | None = None
        self._loaded: int | None = None
        self._seq_length: int | None = None
        self._saved_seq_length: int | None = None
        self._decided = False

    def install(self, model_chunks, context: HookContext) -> None:
        self._parts = fire_targets(model_chunks, self.mode)
        self._skipped = walk_parts(model_chunks)[1]  # modules that declare no parts
        self._loaded = context.extra.get("loaded_iteration")
        self._seq_length = context.extra.get("seq_length")
        if self._on_new_length and context.path == "cpu":
            raise PlasticityError(
                "plasticity.fire.steps names 'seq_length_change' (the first step after "
                "loading a checkpoint trained at another sequence length), but the CPU loop "
                "loads no checkpoints; use step numbers there")

    def _decide_seq_length_change(self) -> None:
        """Add the first step after the load when the checkpoint was trained at another
        sequence length (its saved state says which; a checkpoint without FIRE state counts
        as another phase). A resume at the same length, after a crash, is no boundary."""
        self._decided = True
        if not self._on_new_length or self._loaded is None:
            return
        if self._saved_seq_length is None or self._saved_seq_length != self._seq_length:
            self.steps = sorted(set(self.steps) | {self._loaded + 1})

    def state_dict(self) -> dict[str, Any]:
        return {"seq_length": self._seq_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved_seq_length = state.get("seq_length")

    def before_step(self, step, model_chunks, optimizer) -> None:
        if not self._decided:  # after the loop restored the saved state
            self._decide_seq_length_change()
        if step in self.steps:
            started = time.perf_counter()
            if self._adapter is None or self._adapter.optimizer is not optimizer:
                self._adapter = OptimizerAdapter(optimizer)
            digests = fire_parts(self._parts, self._adapter, self.method)
            assert_decisions_agree(f"FIRE at step {step}", digests)
            touched, elements = sharding.total_over_experts(
                ((p.expert is not None, 1, math.prod(p.global_shape())) for p in self._parts),
                width=2)
            self._events.append({
                "step": step, "kind": "fire", "touched": touched,
                "seconds": time.perf_counter() - started, "mode": self.mode,
                "method": self.method, "elements": elements, "skipped": self._skipped})
        factor = self.rewarmup_factor(step)
        if factor < 1.0:
            for group in param_groups(optimizer):
                group["lr"] = group["lr"] * factor

    def rewarmup_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step``: (k + 1) / rewarmup_iters for the k-th step
        since the latest FIRE, 1 outside the window."""
        if not self.rewarmup_iters:
            return 1.0
        past = [s for s in self.steps if s <= step]
        if not past or step - past[-1] >= self.rewarmup_iters:
            return 1.0
        return (step - past[-1] + 1) / self.rewarmup_iters

    def events(self):
        out, self._events = self._events, []
        return out

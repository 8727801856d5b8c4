"""The training-hook contract: the one seam that both training loops call.

Plasticity (FIRE, DASH, ReDo) and the STP auxiliary loss plug in here and nowhere else. The
CPU loop (:mod:`megacpp_mcore.train.cpu_loop`) and Megatron's ``pretrain`` (through
:mod:`megacpp_mcore.megatron.launcher`) call the same methods at the same points of an
iteration, so a hook written once behaves the same on both paths:

``install(model_chunks, context)``
    once, after the model is built (and wrapped): register forward hooks, find targets.
``before_step(step, model_chunks, optimizer)``
    at the start of iteration ``step`` (1-based, Megatron's numbering), before its first
    micro-batch. This is the safe point to APPLY interventions: the previous optimizer step,
    including Megatron's copy of fp32 main params into the model params, is complete, and no
    gradient of this iteration exists yet. An intervention changes the model params, the
    optimizer's main params and its moments together, here.
``before_micro_batch(batch)``
    before each training micro-batch's forward, with the loop's batch (``tokens`` ``[B, S]``
    of the whole sequence, before any context-parallel slicing; optionally ``padding_mask``):
    what a forward hook needs to know about the data (e.g. end-of-document positions).
``after_step(step, model_chunks, optimizer)``
    after optimizer step ``step`` completed: observe (gradient EMAs, activity statistics)
    and decide what to apply at the next ``before_step``. Reduced gradients are still there
    (``param.grad`` on the CPU; the main params' ``.grad`` under Megatron). Under Megatron it
    runs from a step post-hook of the last inner optimizer, before that optimizer copies its
    main params into the model params: read weights through the optimizer's main params
    (``plasticity.adapter``), never write here.
``metrics()``
    scalars of the last step to log next to the LM loss (e.g. ``stp_loss``), then cleared.
``events()``
    interventions since the last call, each ``{"step", "kind", "touched", "seconds", ...}``,
    for the receipt's ``events`` list, then cleared.
``state_dict()`` / ``load_state_dict(state)``
    what the hook must carry across a checkpoint so a resumed run decides as an
    uninterrupted one.

Hooks are built from the recipe (:func:`megacpp_mcore.features.build_training_hooks`), never
from a process-global registry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class HookContext:
    """What a hook needs to know about the loop that runs it (filled by the loop).

    ``num_microbatches``: micro-batches per iteration on this rank (gradient scale of a loss
    added per micro-batch); ``loss_scale``: the mixed-precision loss scale (1.0 when none);
    ``path``: ``"cpu"`` or ``"megatron"``; ``layout``: the model's
    :class:`~megacpp_mcore.layout.Layout` (None where the loop does not know it);
    ``extra``: loop-specific objects (e.g. Megatron's args).
    """

    num_microbatches: int = 1
    loss_scale: float = 1.0
    path: str = "cpu"
    layout: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingHook:
    """Base class: every method is a no-op, so a hook overrides only what it uses.

    ``goodput_bucket``: the goodput bucket the time spent in ``before_step``/``after_step``
    is charged to (``"plasticity"`` for the plasticity tools; None leaves it in compute).
    """

    name = "hook"
    goodput_bucket: str | None = None

    def install(self, model_chunks: Sequence[torch.nn.Module], context: HookContext) -> None:
        pass

    def before_step(self, step: int, model_chunks: Sequence[torch.nn.Module],
                    optimizer: Any) -> None:
        pass

    def before_micro_batch(self, batch: dict[str, Any]) -> None:
        pass

    def after_step(self, step: int, model_chunks: Sequence[torch.nn.Module],
                   optimizer: Any) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def events(self) -> list[dict[str, Any]]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def remove(self) -> None:
        """Undo ``install`` (remove forward hooks)."""


class HookList:
    """The hooks of one run, called in order; times each call into its goodput bucket."""

    def __init__(self, hooks: Sequence[TrainingHook] = ()) -> None:
        self.hooks = list(hooks)
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"training hooks must have distinct names, got {names}")
        self.timings: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def __iter__(self):
        return iter(self.hooks)

    def _timed(self, hook: TrainingHook, method: str, *args: Any) -> None:
        started = time.perf_counter()
        getattr(hook, method)(*args)
        if hook.goodput_bucket is not None:
            bucket = hook.goodput_bucket
            self.timings[bucket] = self.timings.get(bucket, 0.0) + time.perf_counter() - started

    def install(self, model_chunks: Sequence[torch.nn.Module], context: HookContext) -> None:
        for hook in self.hooks:
            hook.install(list(model_chunks), context)

    def before_step(self, step: int, model_chunks, optimizer) -> None:
        for hook in self.hooks:
            self._timed(hook, "before_step", step, list(model_chunks), optimizer)

    def before_micro_batch(self, batch: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.before_micro_batch(batch)

    def after_step(self, step: int, model_chunks, optimizer) -> None:
        for hook in self.hooks:
            self._timed(hook, "after_step", step, list(model_chunks), optimizer)

    def pop_timings(self) -> dict[str, float]:
        """Seconds per goodput bucket since the last call (the loop adds them to goodput)."""
        out, self.timings = self.timings, {}
        return out

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for hook in self.hooks:
            for key, value in hook.metrics().items():
                if key in out:
                    raise ValueError(f"two training hooks report the metric {key!r}")
                out[key] = value
        return out

    def events(self) -> list[dict[str, Any]]:
        return [event for hook in self.hooks for event in hook.events()]

    def state_dict(self) -> dict[str, Any]:
        return {hook.name: hook.state_dict() for hook in self.hooks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for hook in self.hooks:
            if hook.name in state:
                hook.load_state_dict(state[hook.name])

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

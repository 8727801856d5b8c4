"""Training-time features of a recipe as training hooks: the one place both loops get them.

:func:`build_training_hooks` turns a recipe's feature sections (plasticity, STP) into a
:class:`~megacpp_mcore.train.hooks.HookList`; the CPU loop (through ``megacpp train``) and the
Megatron launcher both call it, so a feature runs on both paths or fails closed on both. The
launcher, which has no recipe, passes any object with the same sections (read back from the
plugin's flags).
"""

from __future__ import annotations

from typing import Any

from megacpp_mcore.settings.config import fire_phase_steps
from megacpp_mcore.train.hooks import HookList, TrainingHook


def plasticity_hooks(plasticity: Any, seed: int = 1234,
                     phases: dict[str, int | None] | None = None) -> list[TrainingHook]:
    """One hook per enabled tool, in a fixed order: FIRE, DASH, ReDo. ``phases``: the step
    each phase name FIRE's steps may use stands for (``fire_phase_steps``)."""
    hooks: list[TrainingHook] = []
    if plasticity is None:
        return hooks
    if plasticity.fire.steps:
        from megacpp_mcore.plasticity.fire import FireHook

        fire = plasticity.fire
        hooks.append(FireHook(fire.steps, fire.mode, fire.method, fire.rewarmup_iters,
                              phases))
    if plasticity.dash.every is not None:
        from megacpp_mcore.plasticity.dash import DashHook

        dash = plasticity.dash
        hooks.append(DashHook(dash.every, dash.start, dash.lam, dash.alpha))
    if plasticity.redo.every is not None:
        from megacpp_mcore.plasticity.redo import RedoHook

        redo = plasticity.redo
        hooks.append(RedoHook(redo.every, redo.start, redo.tau, redo.beta, seed=seed))
    return hooks


def build_training_hooks(recipe: Any) -> HookList:
    """The hooks the recipe asks for, in a fixed order (plasticity before STP)."""
    training = getattr(recipe, "training", None)
    seed = training.seed if training is not None else getattr(recipe, "seed", 1234)
    phases = fire_phase_steps(getattr(training, "lr_warmup_iters", 0), recipe.stp)
    hooks: list[TrainingHook] = plasticity_hooks(getattr(recipe, "plasticity", None), seed,
                                                 phases)
    if recipe.stp.enabled:
        from megacpp_mcore.stp import StpHook

        hooks.append(StpHook.from_recipe(recipe))
    return HookList(hooks)

"""Training-time features of a recipe as training hooks: the one place both loops get them.

:func:`build_training_hooks` turns a recipe's feature sections (plasticity, STP) into a
:class:`~megacpp_mcore.train.hooks.HookList`; the CPU loop (through ``megacpp train``) and the
Megatron launcher both call it, so a feature runs on both paths or fails closed on both.
"""

from __future__ import annotations

from typing import Any

from megacpp_mcore.train.hooks import HookList, TrainingHook


def build_training_hooks(recipe: Any) -> HookList:
    """The hooks the recipe asks for, in a fixed order (plasticity before STP)."""
    hooks: list[TrainingHook] = []
    if recipe.stp.enabled:
        from megacpp_mcore.stp import StpHook

        hooks.append(StpHook.from_recipe(recipe))
    return HookList(hooks)

"""The plasticity recipe section: typed and validated, settable with --set, carried to
Megatron as the plugin's flags and read back, refused by the native target."""

import pytest

from megacpp_mcore.errors import RecipeError, TranslateError
from megacpp_mcore.features import build_training_hooks
from megacpp_mcore.megatron.args import plasticity_config_from_args
from megacpp_mcore.megatron.translate import translate
from megacpp_mcore.settings.recipe import load_recipe
from tests.megatron_helpers import parsed_megatron_args

ALL = ["plasticity.fire.steps=[5,10]", "plasticity.fire.method=paper",
       "plasticity.fire.mode=context_extension", "plasticity.fire.rewarmup_iters=3",
       "plasticity.dash.every=4", "plasticity.dash.lam=0.5", "plasticity.redo.every=7",
       "plasticity.redo.start=2", "plasticity.redo.tau=0.1"]


def test_defaults_schedule_nothing():
    recipe = load_recipe("tiny")
    assert not recipe.plasticity.enabled
    assert not build_training_hooks(recipe)
    assert "--megacpp-plasticity" not in translate(recipe, "plugin").args_line()


def test_set_builds_one_hook_per_tool():
    recipe = load_recipe("tiny", ALL)
    hooks = build_training_hooks(recipe)
    assert [h.name for h in hooks] == ["fire", "dash", "redo"]
    fire, dash, redo = hooks
    assert fire.steps == [5, 10] and fire.method == "paper" and fire.rewarmup_factor(6) == 2 / 3
    assert dash.every == 4 and dash.lam == 0.5 and redo.start == 2 and redo.tau == 0.1
    assert all(h.goodput_bucket == "plasticity" for h in hooks)


def test_fire_steps_beyond_the_run_are_refused():
    with pytest.raises(RecipeError, match=r"plasticity.fire.steps \[500\] lie beyond"):
        load_recipe("tiny", ["plasticity.fire.steps=[500]"])


def test_native_target_refuses_plasticity():
    recipe = load_recipe("tiny", [*ALL, "r_lowering=M"])
    with pytest.raises(TranslateError,
                       match=r"plasticity\.fire\.steps .* needs the plugin.* --target plugin"):
        translate(recipe, "native")


def test_plugin_flags_round_trip_through_megatrons_parser():
    recipe = load_recipe("tiny", ALL)
    with parsed_megatron_args(translate(recipe, "plugin")) as args:
        assert plasticity_config_from_args(args) == recipe.plasticity

"""The plasticity recipe section: typed and validated, settable with --set, carried to
Megatron as the plugin's flags and read back, refused by the native target."""

import pytest
import torch

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


# ----------------------------------------------------------------- named phase boundaries

PHASES = ["plasticity.fire.steps=[warmup_end, stp_start, 40]", "stp.enabled=true",
          "stp.start_step=25"]


def test_fire_steps_name_phase_boundaries():
    """warmup_end is the first step after tiny's 10 warm-up steps; stp_start is STP's gate."""
    recipe = load_recipe("tiny", PHASES)
    assert recipe.plasticity.fire.steps == ("warmup_end", "stp_start", 40)
    [fire, _stp] = build_training_hooks(recipe)
    assert fire.steps == [11, 25, 40]


@pytest.mark.parametrize(("sets", "message"), [
    (["plasticity.fire.steps=[stp_start]"], r"names 'stp_start' but stp.enabled is false"),
    (["plasticity.fire.steps=[warmup_end]", "training.lr_warmup_iters=0"],
     r"names 'warmup_end' but training.lr_warmup_iters is 0"),
    (["plasticity.fire.steps=[11, warmup_end]"], r"repeats a step \(named phases here: "
                                                 r"warmup_end=11"),
    (["plasticity.fire.steps=[warmup_end]", "training.lr_warmup_iters=200"],
     r"\[201\] lie beyond training.train_iters"),
    (["plasticity.fire.steps=[warmup]"], r"steps\[0\]: got a string \('warmup'\); accepted: "
                                         r"an integer or one of 'warmup_end', 'stp_start'"),
    (["plasticity.fire.steps=[0]"], r"steps\[0\]: must be a positive integer"),
])
def test_bad_phase_boundaries_are_refused(sets, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny", sets)


def test_phase_names_round_trip_through_megatrons_parser():
    recipe = load_recipe("tiny", [*PHASES,
                                  "plasticity.fire.steps=[seq_length_change, warmup_end, 40]"])
    line = translate(recipe, "plugin").args_line()
    assert "--megacpp-plasticity-fire-steps seq_length_change warmup_end 40" in line
    with parsed_megatron_args(translate(recipe, "plugin")) as args:
        assert plasticity_config_from_args(args) == recipe.plasticity


def _after_load(loaded, seq_length, saved_seq_length):
    """FIRE's steps once the first step has run in a launcher run that loaded ``loaded``."""
    from megacpp_mcore.plasticity.fire import FireHook
    from megacpp_mcore.train.hooks import HookContext

    hook = FireHook(["seq_length_change", 40])
    hook.install([], HookContext(path="megatron", extra={"loaded_iteration": loaded,
                                                         "seq_length": seq_length}))
    if saved_seq_length is not None:  # what the launcher restores from --load
        hook.load_state_dict({"seq_length": saved_seq_length})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    hook.before_step((loaded or 0) + 1, [], optimizer)  # no model: FIRE has no parts here
    return hook.steps


def test_seq_length_change_is_decided_from_the_saved_state():
    """FIRE at the first step after a load only when the checkpoint was trained at another
    sequence length (context extension); a resume at the same length (a crash) is none."""
    from megacpp_mcore.errors import PlasticityError
    from megacpp_mcore.plasticity.fire import FireHook
    from megacpp_mcore.train.hooks import HookContext

    assert _after_load(30, 8192, 4096) == [31, 40]
    assert _after_load(30, 4096, 4096) == [40]
    assert _after_load(30, 8192, None) == [31, 40]  # no FIRE state saved: a new phase
    assert _after_load(None, 4096, None) == [40]  # nothing loaded
    hook = FireHook(["seq_length_change"])
    hook.install([], HookContext(path="megatron", extra={"seq_length": 4096}))
    assert hook.state_dict() == {"seq_length": 4096}  # what the next resume compares
    with pytest.raises(PlasticityError, match="CPU loop loads no checkpoints"):
        FireHook(["seq_length_change"]).install([], HookContext(path="cpu"))


def test_launcher_resolves_phase_names_from_megatrons_args():
    """The launcher has no recipe: warmup_end comes from --lr-warmup-iters, stp_start from
    the STP flags."""
    from megacpp_mcore.megatron import launcher

    recipe = load_recipe("tiny", PHASES)
    with parsed_megatron_args(translate(recipe, "plugin")) as args:
        [fire, _stp] = list(launcher.hooks_from_args(args))
    assert fire.name == "fire" and fire.steps == [11, 25, 40]

"""The settings table is the one truth: every field has a row, and every construction path
(Python, YAML, Megatron's args) runs the rows' checks with the project's own error."""

import dataclasses
import typing

import pytest

from megacpp_mcore.errors import RecipeError, SpecError
from megacpp_mcore.megatron.args import add_megacpp_args, model_config_from_args
from megacpp_mcore.megatron.translate import translate
from megacpp_mcore.settings import config
from megacpp_mcore.settings.recipe import Recipe, load_recipe
from megacpp_mcore.settings.table import BY_KEY, SETTINGS, plugin_rows
from tests.megatron_helpers import parsed_megatron_args

pytestmark = pytest.mark.filterwarnings("ignore:'type' is deprecated:DeprecationWarning")

#: top-level recipe keys that are not settings rows (the pattern and its bookkeeping)
NOT_ROWS = {"name", "pattern", "description", "backend", "r_lowering"}


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if not f.metadata.get("key", True):
            continue
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, key + ".")
        else:
            yield key


def test_every_setting_has_exactly_one_row():
    keys = [k for k in _keys(Recipe) if k not in NOT_ROWS]
    assert sorted(keys) == sorted(row.key for row in SETTINGS)
    assert len(BY_KEY) == len(SETTINGS)


@pytest.mark.parametrize(("build", "needle"), [
    (lambda: config.ModelConfig(hidden_size=-1), "model.hidden_size: must be a positive integer"),
    (lambda: config.MoEConfig(top_k=0), "model.moe.top_k: must be a positive integer"),
    (lambda: config.MoEConfig(top_k=True), "model.moe.top_k: got True"),
    (lambda: config.ModelConfig(activation="relu"),
     "model.activation: got 'relu' (str); accepted: one of 'swiglu'"),
    (lambda: config.ModelConfig(hidden_dropout=1.0), "model.hidden_dropout: must be in [0, 1)"),
    (lambda: config.ModelConfig(moe={"top_k": 2}), "model.moe: got {'top_k': 2}"),
    (lambda: config.TrainingConfig(lr=float("nan")), "training.lr: must be a finite number"),
    (lambda: config.TrainingConfig(seed=-1), "training.seed: must be >= 0"),
    (lambda: config.RecurrentConfig(num_heads="4"), "model.recurrent.num_heads: got '4'"),
    (lambda: config.ParallelConfig(tensor=0), "parallel.tensor: must be a positive integer"),
    (lambda: Recipe(name="x", pattern="AEM", mtp_depths=-1), "mtp_depths: must be >= 0"),
])
def test_python_construction_is_checked(build, needle):
    with pytest.raises(RecipeError) as info:
        build()
    assert needle in str(info.value)


def test_python_construction_normalises_types():
    assert config.DataConfig(source="path", paths=["a", "b"]).paths == ("a", "b")
    lr = config.TrainingConfig(lr=1, min_lr=0).lr
    assert lr == 1.0 and isinstance(lr, float)


def test_every_plugin_row_is_a_registered_flag():
    import argparse

    parser = add_megacpp_args(argparse.ArgumentParser(prog="x"))
    known = {s for a in parser._actions for s in a.option_strings}
    assert {row.flag for row in plugin_rows()} <= known


def test_settings_read_back_from_megatron_args_are_checked(megatron_single_process):
    plan = translate(load_recipe("tiny", ["backend=local"]), "plugin")
    with parsed_megatron_args(plan, ["--use-cpu-initialization"]) as args:
        assert model_config_from_args(args) == plan.recipe.model
        args.megacpp_r_num_heads = 0
        with pytest.raises(SpecError, match=r"--megacpp-r-num-heads.*model\.recurrent\."
                           r"num_heads: must be a positive integer"):
            model_config_from_args(args)
        args.megacpp_r_num_heads = 4
        args.normalization = "Foo"
        with pytest.raises(SpecError, match=r"--normalization.*accepted: one of 'RMSNorm'"):
            model_config_from_args(args)

"""One schema of settings: every field has a row in the table (its mapping to Megatron) and
its check on its own typed field, and every construction path (Python, YAML, Megatron's
args) runs those checks with the project's own error."""

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
    (lambda: config.MoEConfig(top_k=True),
     "model.moe.top_k: expected an integer, got a boolean (true)"),
    (lambda: config.ModelConfig(activation="relu"),
     "model.activation: got a string ('relu'); accepted: one of 'swiglu'"),
    (lambda: config.ModelConfig(hidden_dropout=1.0), "model.hidden_dropout: must be in [0, 1)"),
    (lambda: config.ModelConfig(moe={"top_k": 2}),
     "model.moe: expected a MoEConfig, got a mapping"),
    (lambda: config.TrainingConfig(lr=float("nan")), "training.lr: must be a finite number"),
    (lambda: config.TrainingConfig(seed=-1), "training.seed: must be >= 0"),
    (lambda: config.RecurrentConfig(num_heads="4"),
     "model.recurrent.num_heads: expected an integer, got a string ('4')"),
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
    # and nothing else: every --megacpp-* flag is derived from a row, none is registered by hand
    assert {s for s in known if s.startswith("--megacpp-")} == {row.flag for row in plugin_rows()}
    assert {"--megacpp-recipe", "--megacpp-recipe-hash", "--megacpp-backend", "--megacpp-data",
            "--megacpp-receipt", "--megacpp-r-num-heads", "--megacpp-r-forget-bf16"} <= known


def test_ranges_are_written_on_the_fields():
    """A range is the field's Annotated type, read by the one type engine (schema.py)."""
    from megacpp_mcore.settings.schema import NON_NEGATIVE, UNIT, hints

    assert typing.get_args(hints(config.TrainingConfig)["seed"])[1] is NON_NEGATIVE
    assert typing.get_args(hints(config.ModelConfig)["hidden_dropout"])[1] is UNIT
    assert config.TrainingConfig(seed=0).seed == 0
    with pytest.raises(RecipeError, match=r"training\.seed: must be >= 0, got -1"):
        config.TrainingConfig(seed=-1)
    with pytest.raises(RecipeError, match=r"model\.attention\.mla_ranks\[1\]: must be >= 0"):
        config.AttentionConfig(mla_ranks=[0, -2])
    assert not hasattr(BY_KEY["training.seed"], "check")  # the table checks nothing


class _Plan:
    """What transformer_config reads of a backend plan, as on a GPU machine."""

    cuda, built, dsa_rotate = True, "te", False

    @staticmethod
    def path(letter):
        return "alltoall"


#: the MLA/DSA TransformerConfig fields the table's rows (and fixed rows) set
LATENT_FIELDS = {
    "q_lora_rank": "mla.q_lora_rank", "kv_lora_rank": "mla.kv_lora_rank",
    "qk_head_dim": "mla.qk_head_dim", "qk_pos_emb_head_dim": "mla.qk_pos_emb_head_dim",
    "v_head_dim": "mla.v_head_dim", "rope_type": "mla.rope_type",
    "dsa_indexer_n_heads": "dsa.indexer_heads", "dsa_indexer_head_dim": "dsa.indexer_head_dim",
    "dsa_indexer_topk": "dsa.top_k", "dsa_indexer_loss_coeff": "dsa.indexer_loss_coeff",
}


@pytest.mark.parametrize(("name", "overrides", "latent"), [
    ("nam56r", [], {"mla", "dsa"}),
    ("nam56r_quarter", [], {"mla", "dsa"}),
    ("tiny", ["model.attention.variant=mla", "model.num_query_groups=null"], {"mla"}),
    ("tiny", [], set()),
    ("nam56r_lite", [], set()),
])
def test_mla_and_dsa_fields_come_from_the_table(name, overrides, latent):
    """transformer_config builds MLATransformerConfig's sizes from the model.attention.* rows
    (active only where the layout builds MLA/DSA); DSA's rotation is the plan's decision."""
    from megacpp_mcore.model import transformer_config
    from megacpp_mcore.settings.table import BY_KEY as rows

    recipe = load_recipe(name, [*overrides, "model.moe.permute_fusion=false"])
    attention = recipe.model.attention
    cfg = transformer_config(recipe.layout, recipe.model, recipe.precision, recipe.parallel,
                             _Plan())
    assert (type(cfg).__name__ == "MLATransformerConfig") == bool(latent)
    for field_name, key in LATENT_FIELDS.items():
        section, _, setting = key.partition(".")
        assert field_name in rows[f"model.attention.{key}"].config
        built = "mla" in latent if section == "mla" else "dsa" in latent
        if built:
            assert getattr(cfg, field_name) == getattr(getattr(attention, section), setting)
    if latent:
        assert (cfg.rotary_base, cfg.rotary_scaling_factor) == (recipe.model.rotary_base, 1.0)
    assert cfg.experimental_attention_variant == ("dsa" if "dsa" in latent else None)
    if "dsa" in latent:
        assert cfg.dsa_indexer_rotate_activation is False  # the plan's, not the recipe's True
        assert attention.dsa.rotate_activation is True


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


def test_a_new_plugin_row_registers_as_its_type():
    """What a plasticity/STP row gets: a switch for a bool, choices for a literal, a checked
    value otherwise (rows borrow existing keys here for their types)."""
    import argparse
    import contextlib
    import io

    from megacpp_mcore.megatron.args import register_row
    from megacpp_mcore.settings.table import Setting

    parser = argparse.ArgumentParser(prog="x")
    register_row(parser, Setting("model.moe.grouped_gemm", "--megacpp-x-switch", kind="switch"))
    register_row(parser, Setting("model.activation", "--megacpp-x-choice"))
    register_row(parser, Setting("model.moe.top_k", "--megacpp-x-count"))
    register_row(parser, Setting("model.moe.shared_expert_ffn_hidden_size", "--megacpp-x-opt"))
    args = parser.parse_args(["--megacpp-x-switch", "--megacpp-x-choice", "gelu",
                              "--megacpp-x-count", "3"])
    assert (args.megacpp_x_switch, args.megacpp_x_choice, args.megacpp_x_count,
            args.megacpp_x_opt) == (True, "gelu", 3, None)
    for bad in (["--megacpp-x-choice", "relu"], ["--megacpp-x-count", "0"],
                ["--megacpp-x-opt", "many"]):
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            parser.parse_args(bad)

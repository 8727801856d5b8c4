"""The per-layer plan (megacpp_mcore.plan): resolved once, carried whole in --megacpp-plan."""

import pytest

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.plan import parse_plan, plan_layers
from megacpp_mcore.settings.recipe import known_recipes, load_recipe
from megacpp_mcore.symbols import decode_symbol, slot_for, symbol_for


@pytest.mark.parametrize("name", known_recipes())
def test_every_shipped_recipe_plan_survives_its_flag(name):
    recipe = load_recipe(name)
    plan = plan_layers(recipe.layout, recipe.model)
    assert parse_plan(plan.flag) == plan
    assert [x.letter for x in plan.layers] == list(recipe.layout.letters)
    for layer in plan.all_layers:  # each layer's symbol decodes back to its letter/variant
        letter, variant = decode_symbol(layer.symbol)
        assert (letter, variant if letter == "A" else None) == (
            "G" if layer.letter == "R" else layer.letter,
            layer.variant if layer.letter == "A" else None)
        assert layer.slot == slot_for(layer.letter, layer.variant)


def test_nam56r_plan_names_every_attention_variant_and_r():
    recipe = load_recipe("nam56r")
    plan = plan_layers(recipe.layout, recipe.model)
    a_layers = [x for x in plan.layers if x.letter == "A"]
    assert [x.number for x in a_layers if x.variant == "mla"] == [1, 17, 33, 49]
    assert {x.variant for x in a_layers} == {"mla", "dsa"}
    assert {x.slot for x in a_layers} == {"mla_layer", "dsa_layer"}
    r_layers = [x for x in plan.layers if x.letter == "R"]
    assert [x.number for x in r_layers] == [12, 24, 36, 48]
    assert {(x.symbol, x.slot) for x in r_layers} == {("G", "recurrent_layer")}
    assert plan.latent == {"mla", "dsa"}


def test_paths_and_stages():
    plan = plan_layers(parse_pattern("AM|FR/MA"))
    assert plan.megatron_pattern == "*M|-G/M*"
    assert plan.flag == "A:gqa M:mamba2 | F R:m2rnn / M:mamba2 A:gqa"
    flat = plan.without_stages()
    assert flat.megatron_pattern == "*M-G/M*" and {x.stage for x in flat.layers} == {0}
    filled = plan.with_paths({"M": "fused", "R": "reference"})
    assert [x.path for x in filled.layers] == [None, "fused", None, "reference"]
    assert filled.record()[1]["path"] == "fused"


@pytest.mark.parametrize("text, why", [
    ("A:gqa X", "token 2 'X'"),
    ("A M:mamba2", "token 1 'A'"),
    ("A:sparse", "token 1 'A:sparse'"),
    ("E:moe", "token 1 'E:moe'"),
    ("", "empty pattern"),
    ("A:gqa | | E", "empty"),
    ("A:gqa E / A:mla F / A:gqa F", "multi-token-prediction parts differ"),
])
def test_a_bad_plan_flag_says_which_token(text, why):
    with pytest.raises(SpecError, match=why):
        parse_plan(text)


def test_native_target_has_no_symbol_for_r():
    with pytest.raises(SpecError, match="no Megatron symbol on the native target"):
        plan_layers(parse_pattern("AR"), target="native")
    assert symbol_for("R") == "G" and symbol_for("A", "dsa", "native") == "D"

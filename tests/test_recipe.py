"""Recipes: shipped recipes load; every validation rule fails closed with the key path."""

import dataclasses
import json
import textwrap
import typing

import pytest
import yaml

from megacpp_mcore.cli.main import main
from megacpp_mcore.errors import RecipeError
from megacpp_mcore.paths import RECIPES_DIR
from megacpp_mcore.settings import config
from megacpp_mcore.settings.describe import describe
from megacpp_mcore.settings.overrides import parse_override
from megacpp_mcore.settings.recipe import Recipe, known_recipes, load_recipe
from megacpp_mcore.settings.schema import field_docs

SHIPPED = ("nam56r", "nam56r_lite", "nam56r_quarter", "nam52", "tiny", "tiny_gdn")

#: a small valid recipe (tiny-like) that the bad cases below modify
BASE = """
pattern: AEMFRA
model:
  hidden_size: 64
  ffn_hidden_size: 256
  num_attention_heads: 4
  num_query_groups: 2
  vocab_size: 512
  seq_length: 128
  moe: {num_experts: 4, top_k: 2, ffn_hidden_size: 128, grouped_gemm: false}
  mamba: {state_dim: 16, head_dim: 16, num_groups: 2}
  recurrent: {num_heads: 4, k_head_dim: 16, v_head_dim: 16}
precision: {params_dtype: fp32}
training: {micro_batch_size: 4, global_batch_size: 8, train_iters: 20}
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# --------------------------------------------------------------------------- shipped recipes


def test_every_shipped_recipe_loads():
    assert set(SHIPPED) <= set(known_recipes())
    for name in known_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.source == f"recipes/{name}.yaml"
        assert recipe.layout.depth >= 1
        assert len(recipe.recipe_hash) == 64


def test_nam56r_lite():
    recipe = load_recipe("nam56r_lite")
    layout = recipe.layout
    assert layout.depth == 52 and layout.counts == {"A": 13, "E": 22, "M": 13, "F": 0,
                                                    "R": 4, "G": 0}
    assert layout.positions("R") == (12, 24, 36, 48)
    m = recipe.model
    assert (m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
            m.seq_length) == (4096, 21504, 32, 8, 4096)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.ffn_hidden_size,
            m.moe.shared_expert_ffn_hidden_size) == (16, 4, 896, 1024)
    assert (m.mamba.state_dim, m.mamba.head_dim, m.mamba.num_groups) == (128, 64, 8)
    assert recipe.mtp_depths == 0 and recipe.precision.params_dtype == "bf16"
    assert recipe.r_lowering is None
    assert recipe.model.attention.variant == "gqa"


def test_nam56r_is_the_seed_model():
    from megacpp_mcore.settings.attention import a_variants

    recipe = load_recipe("nam56r")
    layout, m = recipe.layout, recipe.model
    assert layout.depth == 52 and layout.positions("R") == (12, 24, 36, 48)
    assert layout.mtp == ("AF", "AF") and recipe.mtp_depths == 2
    variants = a_variants(layout, m.attention)
    assert [n for n, v in variants.items() if v == "mla"] == [1, 17, 33, 49]
    assert [n for n, v in variants.items() if v == "dsa"] == [5, 9, 13, 21, 25, 29, 37, 41, 45]
    assert (m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        4096, 21504, 32, None)
    assert (m.mamba.variant, m.mamba.mimo, m.mamba.mimo_rank, m.mamba.chunk_size) == (
        "mamba3", True, 4, 16)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.ffn_hidden_size,
            m.moe.shared_expert_ffn_hidden_size, m.moe.aux_loss_coeff) == (16, 4, 896, 1024, 0.0)
    assert m.activation == "gelu" and m.moe.router_dtype == "fp32"
    assert m.recurrent.heads(m.hidden_size) == 51 and m.recurrent.qk_heads == "shared"
    quarter = load_recipe("nam56r_quarter")
    q_variants = a_variants(quarter.layout, quarter.model.attention)
    assert quarter.layout.depth == 13 and set(q_variants.values()) == {"mla", "dsa"}
    assert quarter.parallel.tensor == quarter.parallel.expert == 1


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.attention.mla_ranks=[13]"], r"A ranks \[13\] that do not exist.*13 A layer"),
    (["model.attention.dsa_layers=[2]"], r"layers \[2\] that are not A layers.*\['E'\]"),
    (["model.attention.dsa_layers=[1]"], r"layer 1 \(an A\) is given two variants"),
    (["model.attention.variant=gqa"], r"mix gqa"),
    (["model.num_query_groups=8"], r"multi-latent attention has no query groups"),
    (["model.moe.token_dispatcher=flex", "parallel.expert=1"], r"TP x EP > 1"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], r"seed's R form"),
])
def test_nam56r_attention_and_r_rules(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("nam56r", overrides)


def test_attention_positions_without_any_a_are_refused():
    with pytest.raises(RecipeError, match=r"A ranks \[0\] that do not exist.*0 A layer"):
        load_recipe("tiny", ["pattern=EMFR", "model.attention.mla_ranks=[0]"])


def test_nam52_is_nemotron_h_8b():
    recipe = load_recipe("nam52")
    m = recipe.model
    assert recipe.layout.counts == {"A": 4, "E": 0, "M": 24, "F": 24, "R": 0, "G": 0}
    assert (m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        4096, 21504, 32, 8)
    assert (m.mamba.num_heads, m.mamba.head_dim, m.mamba.state_dim, m.mamba.num_groups) == (
        128, 64, 128, 8)
    assert (m.activation, m.position_embedding, m.seq_length) == ("squared_relu", "none", 8192)


def test_tiny_is_cpu_sized():
    recipe = load_recipe("tiny")
    assert recipe.layout.letters == "AEMFRA" and not recipe.layout.has("G")
    m = recipe.model
    assert 64 <= m.hidden_size <= 128
    assert (m.num_attention_heads, m.num_query_groups, m.seq_length, m.vocab_size) == (
        4, 2, 128, 512)
    assert (m.moe.num_experts, m.moe.top_k) == (4, 2)
    assert (m.mamba.state_dim, m.mamba.head_dim, m.mamba.num_groups) == (16, 16, 2)
    assert (m.recurrent.num_heads, m.recurrent.k_head_dim, m.recurrent.v_head_dim) == (4, 16, 16)
    assert recipe.precision.params_dtype == "fp32" and recipe.backend == "auto"
    t = recipe.training
    assert (t.micro_batch_size, t.global_batch_size, t.log_interval) == (4, 8, 10)
    assert recipe.data.source == "embedded" and recipe.data.tokenizer == "byte"


def test_tiny_gdn_inherits_tiny():
    tiny, gdn = load_recipe("tiny"), load_recipe("tiny_gdn")
    assert gdn.layout.has("G") and gdn.layout.letters == "AEMFRG"
    assert gdn.model.moe == tiny.model.moe and gdn.model.hidden_size == tiny.model.hidden_size
    assert gdn.model.gdn.num_key_heads == 2 and gdn.precision.params_dtype == "bf16"
    assert gdn.training == tiny.training


def test_recipe_hash_is_stable_and_covers_settings(tmp_path):
    a = load_recipe("tiny")
    assert a.recipe_hash == load_recipe("tiny").recipe_hash
    assert load_recipe("tiny", ["model.hidden_size=128"]).recipe_hash != a.recipe_hash
    # the description and the file name are not settings
    copy = tmp_path / "renamed.yaml"
    copy.write_text((RECIPES_DIR / "tiny.yaml").read_text().replace("Tiny CPU", "Other"))
    assert load_recipe(copy).description != a.description
    assert load_recipe(copy).recipe_hash == a.recipe_hash
    # a family name and its literal spelling hash the same
    fam = write(tmp_path, BASE.replace("pattern: AEMFRA", "pattern: tiny"), "fam.yaml")
    lit = write(tmp_path, BASE.replace("pattern: AEMFRA", "pattern: AEMFRG\ndepth: 6"), "l.yaml")
    assert load_recipe(fam).recipe_hash == load_recipe(lit).recipe_hash


# --------------------------------------------------------------------------- types and keys

TYPE_CASES = [
    ("plastic: {fire: true}", "plastic: unknown key", "accepted: the keys of a recipe"),
    ("plasticity: {fire: true}", "plasticity.fire: expected a section", "steps"),
    ("plasticity: {dash: {lam: 0}}", "plasticity.dash.lam: must be in (0, 1]", None),
    ("plasticity: {fire: {steps: [0]}}", "plasticity.fire.steps[0]: must be a positive", None),
    ("plasticity: {fire: {mode: qk}}", "plasticity.fire.mode: got a string ('qk')",
     "context_extension"),
    ("model: {moe: {topk: 2}}", "model.moe.topk: unknown key", "top_k"),
    ("model: {hidden_size: true}", "model.hidden_size: expected an integer, got a boolean "
     "(true)", None),
    ("model: {hidden_size: 64.0}", "model.hidden_size: expected an integer, got a number", None),
    ("model: {hidden_size: '64'}", "model.hidden_size: expected an integer, got a string", None),
    ("model: {hidden_size: null}", "model.hidden_size: null is not allowed", "an integer"),
    ("model: {num_query_groups: 2.5}", "model.num_query_groups: expected an integer",
     "an integer, or null"),
    ("training: {lr: fast}", "training.lr: expected a number, got a string", None),
    ("training: {lr: true}", "training.lr: expected a number, got a boolean", None),
    ("parallel: {sequence_parallel: 1}", "parallel.sequence_parallel: expected true or "
     "false, got an integer (1)", None),
    ("model: {activation: relu}", "model.activation: got a string ('relu')",
     "one of 'swiglu', 'squared_relu', 'gelu'"),
    ("backend: cuda", "backend: got a string ('cuda')", "one of 'auto', 'te', 'local'"),
    ("r_lowering: R", "r_lowering: got a string ('R')", "one of 'M', 'A', 'F', 'E', 'G', or null"),
    ("data: {tokenizer: bpe}", "data.tokenizer: got a string ('bpe')", "'byte', or null"),
    ("model: 5", "model: expected a section, got an integer (5)", "a mapping with keys"),
    ("data: {source: path, paths: /data/x}", "data.paths: expected a list", "a list of strings"),
    ("data: {source: path, paths: [1]}", "data.paths[0]: expected a string", None),
    ("model: {hidden_size: 0}", "model.hidden_size: must be a positive integer", None),
    ("model: {moe: {top_k: -1}}", "model.moe.top_k: must be a positive integer", None),
    ("mtp_depths: -1", "mtp_depths: must be >= 0", None),
    ("model: {hidden_dropout: 1.0}", "model.hidden_dropout: must be in [0, 1)", None),
    ("model: {attention_dropout: -0.1}", "model.attention_dropout: must be in [0, 1)", None),
    ("training: {adam_beta2: 1}", "training.adam_beta2: must be in [0, 1)", None),
    ("training: {lr: 0}", "training.lr: must be > 0", None),
    ("training: {lr: .inf}", "training.lr: must be a finite number", None),
    ("model: {moe: {aux_loss_coeff: -1.0e-2}}", "model.moe.aux_loss_coeff: must be >= 0", None),
    ("model: {norm_epsilon: 0.0}", "model.norm_epsilon: must be > 0", None),
]


@pytest.mark.parametrize(("extra", "needle", "accepted"), TYPE_CASES)
def test_bad_types_and_values_name_the_key(tmp_path, extra, needle, accepted):
    path = write(tmp_path, merged(extra))
    message = error_of(path)
    assert message.startswith(f"{path}: "), message
    assert needle in message, message
    if accepted:
        assert "accepted: " in message and accepted in message, message


def _deep_update(data: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _deep_update(data[key], value)
        else:
            data[key] = value


def merged(extra: str) -> str:
    """BASE with the YAML ``extra`` deep-merged into it."""
    data = yaml.safe_load(BASE)
    _deep_update(data, yaml.safe_load(extra))
    return yaml.safe_dump(data, sort_keys=False)


def test_int_is_accepted_for_a_number_and_exponents_are_numbers(tmp_path):
    path = write(tmp_path, BASE.replace("train_iters: 20}", "train_iters: 20, lr: 1, "
                                        "min_lr: 3e-5}"))
    recipe = load_recipe(path)
    assert recipe.training.lr == 1.0 and isinstance(recipe.training.lr, float)
    assert recipe.training.min_lr == 3e-5


def test_duplicate_keys_and_bad_yaml(tmp_path):
    dup = write(tmp_path, BASE + "pattern: AEM\n")
    assert "duplicate key 'pattern'" in error_of(dup)
    bad = write(tmp_path, "pattern: [AEM\n")
    assert "not valid YAML" in error_of(bad)
    scalar = write(tmp_path, "just text\n")
    assert "a recipe is a mapping" in error_of(scalar)


def test_missing_pattern_and_bad_pattern(tmp_path):
    assert "pattern: required key is missing" in error_of(write(tmp_path, "depth: 4\n"))
    message = error_of(write(tmp_path, BASE.replace("AEMFRA", "AEXFRA")))
    assert "pattern" in message and "unknown letter 'X'" in message
    message = error_of(write(tmp_path, BASE.replace("AEMFRA", "nam99")))
    assert "known families" in message


# --------------------------------------------------------------------------- cross-field rules

CROSS_CASES = [
    (["parallel.tensor=3"], "model.num_attention_heads (4) must be divisible by "
     "parallel.tensor (3)"),
    (["model.num_query_groups=3"], "model.num_attention_heads (4) must be divisible by "
     "model.num_query_groups (3)"),
    (["parallel.tensor=4", "parallel.sequence_parallel=true", "model.num_query_groups=2",
      "model.recurrent.num_heads=4", "model.mamba.num_groups=4"],
     "model.num_query_groups (2) must be divisible by parallel.tensor (4)"),
    (["model.hidden_size=66", "model.mamba.num_heads=8"], "model.hidden_size (66) must be "
     "divisible by model.num_attention_heads"),
    (["parallel.expert=3"], "model.moe.num_experts (4) must be divisible by parallel.expert (3)"),
    (["model.moe.top_k=1"], "model.moe.top_k 1 with model.moe.router_score_function softmax"),
    (["model.moe.top_k=5"], "model.moe.top_k (5) must be between 1 and model.moe.num_experts"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "model.mamba.num_groups=1"],
     "model.mamba.num_groups (1) must be divisible by parallel.tensor (2)"),
    (["parallel.tensor=4", "parallel.sequence_parallel=true", "model.mamba.num_heads=6",
      "model.mamba.num_groups=2"], "Mamba heads (model.mamba.num_heads) (6) must be divisible "
     "by parallel.tensor (4)"),
    (["model.mamba.num_heads=6", "model.mamba.num_groups=4"], "Mamba heads "
     "(model.mamba.num_heads) (6) must be divisible by model.mamba.num_groups (4)"),
    (["model.mamba.head_dim=24"], "2 * model.hidden_size (128) must be divisible by "
     "model.mamba.head_dim"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "model.recurrent.num_heads=3"],
     "model.recurrent.num_heads (3) must be divisible by parallel.tensor (2)"),
    (["pattern=AEMFRG", "parallel.tensor=2", "parallel.sequence_parallel=true",
      "model.gdn.num_key_heads=1", "model.gdn.num_value_heads=4"],
     "model.gdn.num_key_heads (1) must be divisible by parallel.tensor (2)"),
    (["pattern=AEMFRG", "model.gdn.num_key_heads=3", "model.gdn.num_value_heads=4"],
     "model.gdn.num_value_heads (4) must be divisible by model.gdn.num_key_heads (3)"),
    (["pattern=AEM|FRA"], "the pattern has 2 pipeline stages ('|') but parallel.pipeline is 1"),
    (["parallel.pipeline=4"], "depth (6) must be divisible by parallel.pipeline (4)"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor > 1"),
    (["parallel.tensor=2"], "MoE layers with parallel.tensor > 1 need "
     "parallel.sequence_parallel"),
    (["parallel.expert=2", "pattern=AMFRA"], "parallel.expert (2) > 1 but the layout has no E"),
    (["training.global_batch_size=6"], "training.global_batch_size (6) must be divisible by "
     "training.micro_batch_size (4)"),
    (["parallel.distributed_optimizer=true", "parallel.fsdp=torch_fsdp2"],
     "parallel.distributed_optimizer and parallel.fsdp (torch_fsdp2) are exclusive"),
    (["parallel.fsdp=torch_fsdp2", "parallel.pipeline=2"],
     "parallel.fsdp torch_fsdp2 needs parallel.pipeline 1"),
    (["parallel.fsdp=torch_fsdp2", "model.tie_embeddings=true"],
     "parallel.fsdp torch_fsdp2 needs model.tie_embeddings false"),
    (["parallel.context=3"], "model.seq_length (128) must be divisible by 2 * parallel.context "
     "(6)"),
    (["mtp_depths=1"], "mtp_depths (1) does not match the pattern's 0 multi-token-prediction"),
    (["pattern=AEMFRA/MA"], "mtp_depths (0) does not match the pattern's 1"),
    (["r_lowering=M", "pattern=AEMFAA"], "r_lowering (M) is set but the layout 'AEMFAA' has no "
     "R layer"),
    (["r_lowering=G", "model.gdn.num_key_heads=3"], "model.gdn.num_value_heads (32) must be "
     "divisible by model.gdn.num_key_heads (3)"),
    (["precision.grad_reduce_in_fp32=false"], "precision.grad_reduce_in_fp32 is false but "
     "precision.params_dtype is fp32"),
    (["training.min_lr=0.1", "training.lr=0.01"], "training.min_lr (0.1) must not exceed "
     "training.lr (0.01)"),
    (["training.lr_warmup_iters=20"], "training.lr_warmup_iters (20) must be smaller than "
     "training.train_iters (20)"),
    (["training.eval_interval=5", "training.eval_iters=0"], "training.eval_iters is 0"),
    (["data.source=path"], "data.source is path but data.paths is empty"),
    (["data.paths=[/x]"], "data.paths is set but data.source is embedded"),
    (["data.tokenizer=null"], "data.source embedded needs data.tokenizer byte"),
    (["model.vocab_size=256"], "model.vocab_size (256) is smaller than the byte tokenizer's 257"),
    (["data.split=98,2"], "data.split ('98,2') must be three non-negative weights"),
]


@pytest.mark.parametrize(("overrides", "needle"), CROSS_CASES)
def test_cross_field_rules(tmp_path, overrides, needle):
    path = write(tmp_path, BASE)
    message = error_of(path, overrides)
    assert message.startswith(f"{path} with --set"), message
    assert "the recipe is inconsistent" in message
    assert needle in message, message


def test_only_families_in_the_layout_are_checked(tmp_path):
    # without E, MoE sizes are not checked (top_k > experts would be an error with E)
    path = write(tmp_path, BASE)
    assert load_recipe(path, ["pattern=AMFRA", "model.moe.top_k=9"]).model.moe.top_k == 9
    # without M, the Mamba rules are not checked
    load_recipe(path, ["pattern=AEFRA", "model.mamba.num_heads=6", "model.mamba.num_groups=4"])
    # with TP 2 and no E, no sequence parallelism is required
    load_recipe(path, ["pattern=AMFRA", "parallel.tensor=2"])


def test_mtp_depths_agree_with_the_pattern(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["pattern=AEMFRA/MA/MA", "mtp_depths=2"])
    assert recipe.layout.mtp == ("MA", "MA") and recipe.mtp_depths == 2


def test_errors_collect_every_problem(tmp_path):
    message = error_of(write(tmp_path, BASE), ["parallel.tensor=3", "mtp_depths=2"])
    assert "mtp_depths (2)" in message and "parallel.tensor (3)" in message


# --------------------------------------------------------------------------- base and --set


def test_base_chain_deep_merges(tmp_path):
    write(tmp_path, BASE, "a.yaml")
    write(tmp_path, "base: a.yaml\nmodel: {moe: {top_k: 3}}\ntraining: {lr: 2.0e-3}\n", "b.yaml")
    c = write(tmp_path, "base: b.yaml\nmodel: {hidden_size: 128, moe: {num_experts: 8}}\n",
              "c.yaml")
    recipe = load_recipe(c)
    assert recipe.name == "c"
    assert recipe.model.hidden_size == 128 and recipe.model.num_attention_heads == 4
    assert (recipe.model.moe.num_experts, recipe.model.moe.top_k,
            recipe.model.moe.ffn_hidden_size) == (8, 3, 128)
    assert recipe.training.lr == 2e-3 and recipe.training.train_iters == 20


def test_error_in_a_base_names_the_base_file(tmp_path):
    a = write(tmp_path, BASE + "logging: {receipt_dirr: x}\n", "a.yaml")
    b = write(tmp_path, "base: a.yaml\n", "b.yaml")
    message = error_of(b)
    assert message.startswith(f"{a}: logging.receipt_dirr: unknown key"), message


def test_base_cycles_and_missing_bases(tmp_path):
    write(tmp_path, "base: b.yaml\n" + BASE, "a.yaml")
    b = write(tmp_path, "base: a.yaml\n", "b.yaml")
    assert "base recipes form a cycle" in error_of(b)
    self_cycle = write(tmp_path, "base: s.yaml\n" + BASE, "s.yaml")
    assert "cycle" in error_of(self_cycle)
    missing = write(tmp_path, "base: nowhere.yaml\n", "m.yaml")
    assert "base: no such recipe file" in error_of(missing)
    not_text = write(tmp_path, "base: 3\n", "n.yaml")
    assert "base: expected a file name" in error_of(not_text)


def test_overrides(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["model.hidden_size=128", "training.lr=3e-4",
                                "parallel.sequence_parallel=false", "data.source=path",
                                "data.paths=[/d/a, /d/b]", "model.num_query_groups=null"])
    assert recipe.model.hidden_size == 128 and recipe.training.lr == 3e-4
    assert recipe.data.paths == ("/d/a", "/d/b") and recipe.model.num_query_groups is None
    assert recipe.overrides[0] == "model.hidden_size=128"
    assert parse_override("pattern=AEM|FRA") == ("pattern", "AEM|FRA")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.hiden_size=1", "--set model.hiden_size=1: model.hiden_size: unknown key; "
         "accepted keys of model: hidden_size"),
        ("plastic.fire=true", "plastic: unknown key"),
        ("plasticity.fire.stepz=[3]", "plasticity.fire.stepz: unknown key; accepted keys of "
         "plasticity.fire: steps, mode, method, rewarmup_iters"),
        ("base=other.yaml", "base cannot be overridden"),
        ("model.hidden_size", "expected KEY=VALUE"),
        ("model.hidden_size.x=1", "model.hidden_size is a value, not a section"),
        ("model.hidden_size=true", "--set model.hidden_size=true: model.hidden_size: expected "
         "an integer, got a boolean (true)"),
        ("model=3", "--set model=3: model: expected a section"),
        ("name=other", "name: unknown key"),
    ],
)
def test_bad_overrides(tmp_path, override, needle):
    message = error_of(write(tmp_path, BASE), [override])
    assert needle in message, message


def test_recipe_by_name_or_unknown():
    assert load_recipe("tiny.yaml") == load_recipe("tiny")
    with pytest.raises(RecipeError, match=r"known recipes: .*nam56r"):
        load_recipe("nam99")


def test_direct_construction_is_validated():
    with pytest.raises(RecipeError, match="mtp_depths"):
        Recipe(name="x", pattern="AEM/MA", mtp_depths=0)
    recipe = Recipe(name="x", pattern="AEMFRA", model=load_recipe("tiny").model)
    with pytest.raises(RecipeError, match=r"parallel\.tensor \(3\)"):
        dataclasses.replace(recipe, parallel=config.ParallelConfig(tensor=3))


# --------------------------------------------------------------------------- documentation


def _sections(cls):
    yield cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


#: every settings section a recipe holds (Recipe itself, model, model.moe, ...)
SECTIONS = tuple(dict.fromkeys(_sections(Recipe)))


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_is_documented_once(cls):
    """Each field's doc is the string literal right under it (an attribute docstring); the
    class docstring is one short paragraph, with no ``Attributes:`` list."""
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(docs) == set(names), set(names) ^ set(docs)
    assert all(docs[n].strip() for n in names)
    assert "Attributes:" not in (cls.__doc__ or "")
    assert len(SECTIONS) >= 20


def test_describe_lists_every_key_with_its_doc():
    text = describe()
    assert "(undocumented)" not in text

    def paths(cls, prefix):
        for f in dataclasses.fields(cls):
            if not f.metadata.get("key", True) or f.name == "name":
                continue
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from paths(tp, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    for path in paths(Recipe, ""):
        assert f"  {path}  (" in text, path
    assert "experts each token is routed to." in text  # from MoEConfig's docstring


def test_cli_show_and_describe(capsys, tmp_path):
    assert main(["recipe", "show", "tiny", "--json", "--set", "model.hidden_size=128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "tiny" and out["recipe"]["model"]["hidden_size"] == 128
    assert out["hash"] == load_recipe("tiny", ["model.hidden_size=128"]).recipe_hash
    assert out["layout"]["layers"] == list("AEMFRA")
    assert main(["recipe", "show", "nam56r"]) == 0
    text = capsys.readouterr().out
    assert "# hash" in text and "num_experts: 16" in text
    assert main(["recipe", "describe"]) == 0
    assert "model.moe.top_k" in capsys.readouterr().out
    assert main(["recipe", "show", "tiny", "--set", "model.hidden_size=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megacpp recipe: error:") and "model.hidden_size" in err

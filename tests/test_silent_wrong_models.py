"""Silent wrong models: what is built is what was asked for, or the build is refused.

(a) '|' pipeline stages against the pipeline size; (b) build_model and Megatron's launcher
agree on the TransformerConfig; (c) size rules Megatron enforces only at build time are
refused when the settings are made, naming the key.
"""

import dataclasses
import re

import pytest
import torch
from megatron.training.argument_utils import hybrid_config_from_args

from megacpp_mcore import model as model_module
from megacpp_mcore.backend import BackendPlan, FamilyBuild, resolve_backend
from megacpp_mcore.errors import PatternError, RecipeError, SpecError, TranslateError
from megacpp_mcore.layout import FAMILIES, Layer, Layout, parse_pattern
from megacpp_mcore.megatron.spec_seam import BUILDER_MARK, stack_spec_from_args
from megacpp_mcore.megatron.translate import translate
from megacpp_mcore.model import build_model, stage_problem, transformer_config
from megacpp_mcore.receipt import load_receipt
from megacpp_mcore.settings.config import ParallelConfig
from megacpp_mcore.settings.recipe import known_recipes, load_recipe
from megacpp_mcore.settings.table import FIXED, SETTINGS
from megacpp_mcore.train.cpu_loop import train_on_cpu
from megacpp_mcore.train.hooks import HookList, TrainingHook
from tests.conftest import tiny_model_config
from tests.megatron_helpers import parsed_megatron_args

pytestmark = pytest.mark.filterwarnings("ignore:'type' is deprecated:DeprecationWarning")


# --------------------------------------------------------------------------- (a) stages


def test_build_model_builds_every_stage_at_pipeline_size_one(megatron_single_process):
    model = build_model(parse_pattern("AEM|FRA"), tiny_model_config(), backend="local")
    assert model.decoder.layer_letters == "AEMFRA" and len(model.decoder.layers) == 6
    tokens = torch.randint(0, 256, (1, 32))
    logits = model(tokens, torch.arange(32)[None], None)
    assert logits.shape[:2] == (1, 32)


def test_build_model_refuses_stages_that_differ_from_the_pipeline_size(monkeypatch):
    monkeypatch.setattr(model_module, "current_parallel", lambda: ParallelConfig(pipeline=2))
    with pytest.raises(SpecError, match=r"has 3 pipeline stages \('\|'\) but the "
                       r"pipeline-parallel size is 2"):
        build_model(parse_pattern("AE|MF|RA"), tiny_model_config(), backend="local")
    assert stage_problem(parse_pattern("AE|MF|RA"), 3) is None
    assert stage_problem(parse_pattern("AEMFRA"), 2) is None


class _Letters(TrainingHook):
    def install(self, model_chunks, context):
        self.letters = "".join(chunk.decoder.layer_letters for chunk in model_chunks)


def test_cpu_training_path_builds_the_whole_staged_model(tmp_path):
    recipe = load_recipe("tiny", ["pattern=AEM|FRA", "parallel.pipeline=2",
                                  "model.seq_length=32", "training.micro_batch_size=1",
                                  "training.global_batch_size=2", "training.train_iters=2",
                                  "training.lr_warmup_iters=0", "training.log_interval=1"])
    hook = _Letters()
    train_on_cpu(recipe, receipt_path=tmp_path / "r.json", print_fn=None,
                 hooks=HookList([hook]))
    assert hook.letters == "AEMFRA"
    data = load_receipt(tmp_path / "r.json").data
    assert data["pattern"]["depth"] == 6


def test_spec_seam_refuses_stages_megatron_would_build_in_part(megatron_single_process):
    plan = translate(load_recipe("tiny", ["pattern=AEM|FRA", "parallel.pipeline=2",
                                          "backend=local"]), "plugin")
    with parsed_megatron_args(plan, ["--use-cpu-initialization"]) as args:
        args.pipeline_model_parallel_size = 1
        with pytest.raises(SpecError, match="has 2 pipeline stages"):
            stack_spec_from_args(args)


class _ReachedBackend(Exception):
    pass


@pytest.mark.parametrize("coeff", [0.0, 0.001])
def test_spec_seam_refuses_overlapped_grad_reduce_with_an_untrained_dsa_indexer(
        megatron_single_process, monkeypatch, coeff):
    """nam56r keeps the seed's indexer loss 0: no gradient reaches the DSA indexer (checked
    on an H200 by tests/gpu/test_recipes_gpu.py), which Megatron's DDP cannot overlap."""
    from megacpp_mcore.megatron import spec_seam

    def reached(*_args, **_kwargs):  # past every check; MLA/DSA themselves need a GPU
        raise _ReachedBackend

    monkeypatch.setattr(spec_seam, "model_backend", reached)
    recipe = load_recipe("nam56r", [f"model.attention.dsa.indexer_loss_coeff={coeff}",
                                    "model.moe.token_dispatcher=alltoall",
                                    "pattern=AEMEAEMEAEMR", "mtp_depths=0"])  # MTP: CUDA
    plan = translate(recipe, "plugin")
    with parsed_megatron_args(plan, ["--overlap-grad-reduce"]) as args:
        assert args.overlap_grad_reduce
        setattr(args, BUILDER_MARK, True)  # the plugin's builder (n-gram features) builds
        if coeff:  # the indexer has its loss
            with pytest.raises(_ReachedBackend):
                stack_spec_from_args(args)
        else:
            with pytest.raises(SpecError, match=r"--overlap-grad-reduce with DSA and "
                               r"--dsa-indexer-loss-coeff 0 .*drop --overlap-grad-reduce"):
                stack_spec_from_args(args)
            args.overlap_grad_reduce = False
            with pytest.raises(_ReachedBackend):
                stack_spec_from_args(args)


# --------------------------------------------------------------------------- (b) one config


def _single(value):
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _gpu_plan(recipe, args):
    """The backend plan build_model makes on a GPU machine for what the flags ask."""
    built = "te" if args.transformer_impl == "transformer_engine" else "local"
    families = {
        letter: FamilyBuild(letter, FAMILIES[letter], recipe.backend, built,
                            recipe.model.moe.token_dispatcher if letter == "E" else None,
                            "as on a GPU machine")
        for letter in FAMILIES if recipe.layout.has(letter)}
    return BackendPlan(recipe.backend, built, cuda=True, families=families)


@pytest.mark.parametrize(("name", "overrides"), [
    *[(name, []) for name in known_recipes()],
    ("tiny", ["model.activation=squared_relu"]),
    ("tiny", ["model.activation=gelu", "model.position_embedding=none"]),
])
def test_build_model_and_the_launcher_make_the_same_transformer_config(name, overrides):
    recipe = load_recipe(name, overrides)
    if recipe.layout.has("E") and recipe.model.moe.permute_fusion:
        # Megatron's config refuses permute fusion without Transformer Engine >= 2.1 (no TE here)
        recipe = load_recipe(name, [*overrides, "model.moe.permute_fusion=false"])
    plan = translate(recipe, "plugin")
    with parsed_megatron_args(plan) as args:
        launcher = hybrid_config_from_args(args).transformer
        ours = transformer_config(recipe.layout, recipe.model, recipe.precision,
                                  recipe.parallel, _gpu_plan(recipe, args))
    letters = recipe.layout.letters
    fields = {field for row in SETTINGS if row.used_by(letters)
              for field in row.config_fields(recipe)}
    fields |= {fixed.config for fixed in FIXED if fixed.applies(recipe)}
    fields |= {"num_layers", "mtp_num_layers", "transformer_impl", "bias_activation_fusion",
               "bias_dropout_fusion", "activation_func", "gated_linear_unit", "params_dtype"}
    assert len(fields) > 30
    for field in sorted(fields):
        assert _single(getattr(ours, field)) == _single(getattr(launcher, field)), field


# --------------------------------------------------------------------------- (c) size rules


def test_shared_expert_width_is_checked_against_tensor_parallel_at_load():
    with pytest.raises(RecipeError, match=r"model\.moe\.shared_expert_ffn_hidden_size \(1023\) "
                       r"must be divisible by parallel\.tensor \(2\)"):
        load_recipe("nam56r", ["parallel.tensor=2", "parallel.sequence_parallel=true",
                               "model.moe.shared_expert_ffn_hidden_size=1023"])


def test_mamba_heads_and_groups_are_checked_against_context_parallel_at_load():
    with pytest.raises(RecipeError) as info:
        load_recipe("nam52", ["parallel.tensor=1", "parallel.sequence_parallel=false",
                              "parallel.context=4", "model.mamba.num_groups=2",
                              "model.mamba.num_heads=6"])
    message = str(info.value)
    assert "Mamba heads per tensor-parallel rank (6 / 1) (6) must be divisible by " \
           "parallel.context (4)" in message
    assert "parallel.context (4) must be divisible by model.mamba.num_groups per " \
           "tensor-parallel rank (2 / 1) (2)" not in message  # 4 % 2 == 0: this one holds
    assert load_recipe("nam52", ["parallel.tensor=1", "parallel.sequence_parallel=false",
                                 "parallel.context=4"]).parallel.context == 4


def test_plugin_mixers_refuse_context_parallel_before_building(monkeypatch):
    with pytest.raises(TranslateError, match=r"the plugin's Mamba-2 mixer \(M layers 3\)"):
        translate(load_recipe("tiny", ["parallel.context=2"]), "plugin")
    monkeypatch.setattr(model_module, "current_parallel", lambda: ParallelConfig(context=2))
    with pytest.raises(SpecError, match=r"the plugin's recurrent mixer \(R layers 1\)"):
        build_model(parse_pattern("RA"), tiny_model_config(), backend="local")


def test_build_model_refuses_a_shared_expert_width_megatron_would_assert_on(monkeypatch):
    monkeypatch.setattr(model_module, "current_parallel", lambda: ParallelConfig(tensor=2))
    moe = dataclasses.replace(tiny_model_config().moe, shared_expert_ffn_hidden_size=33)
    with pytest.raises(SpecError, match=r"shared_expert_ffn_hidden_size \(33\)"):
        build_model(parse_pattern("E"), tiny_model_config(moe=moe), backend="local",
                    sequence_parallel=True)


def test_r_head_sizes_the_fused_scan_lacks_fall_back_to_the_reference_and_say_so():
    layout = parse_pattern("RA")
    plan = resolve_backend("local", layout, cuda=True, r_head_dims=(48, 16))
    assert plan.families["R"].path == "reference"
    assert "supports k_head_dim in (16, 32, 64, 128, 256)" in plan.families["R"].reason
    assert resolve_backend("local", layout, cuda=True, r_head_dims=(64, 16)).path("R") == "fused"


@pytest.mark.parametrize(("build", "needle"), [
    (lambda: Layout(layers=(Layer(0, "X", 0),)), "unknown letter 'X'"),
    (lambda: Layer(0, "a", 0), "unknown letter 'a'"),
    (lambda: Layer(0, "A", -1), "stage must be an integer >= 0"),
    (lambda: Layout(layers=()), "at least one layer"),
    (lambda: Layout(layers=(Layer(0, "A", 0), Layer(1, "M", 2))), "grow by one"),
    (lambda: Layout(layers=(Layer(1, "A", 0),)), "expected index 0"),
    (lambda: Layout(layers=(Layer(0, "A", 0),), mtp_layers=(Layer(0, "M", 0, 1),
                                                           Layer(0, "A", 0, 2))),
     "identical to MTP part 1"),
    (lambda: Layout(layers="AEM"), "must be a tuple of Layer"),
])
def test_a_layout_built_directly_is_checked(build, needle):
    with pytest.raises(PatternError, match=re.escape(needle)):
        build()


def test_a_layout_built_directly_equals_the_parsed_one():
    layers = tuple(Layer(i, x, 0 if i < 2 else 1) for i, x in enumerate("AEMF"))
    assert Layout(layers=layers) == parse_pattern("AE|MF")

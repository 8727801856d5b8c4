"""Silent wrong models: what is built is what was asked for, or the build is refused.

(a) '|' pipeline stages against the pipeline size; (b) build_model and Megatron's launcher
agree on the TransformerConfig; (c) size rules Megatron enforces only at build time are
refused when the settings are made, naming the key.
"""

import pytest
import torch
from megatron.training.argument_utils import hybrid_config_from_args

from megacpp_mcore import model as model_module
from megacpp_mcore.backend import BackendPlan, FamilyBuild
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import FAMILIES, parse_pattern
from megacpp_mcore.megatron.spec_seam import stack_spec_from_megatron_args
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
            stack_spec_from_megatron_args(args)


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
    plan = translate(recipe, "plugin")
    with parsed_megatron_args(plan) as args:
        launcher = hybrid_config_from_args(args).transformer
        ours = transformer_config(recipe.layout, recipe.model, recipe.precision,
                                  recipe.parallel, _gpu_plan(recipe, args))
    letters = recipe.layout.letters
    fields = {field for row in SETTINGS if row.used_by(letters) for field in row.config}
    fields |= {fixed.config for fixed in FIXED}
    fields |= {"num_layers", "mtp_num_layers", "transformer_impl", "bias_activation_fusion",
               "bias_dropout_fusion", "activation_func", "gated_linear_unit", "params_dtype"}
    assert len(fields) > 30
    for field in sorted(fields):
        assert _single(getattr(ours, field)) == _single(getattr(launcher, field)), field

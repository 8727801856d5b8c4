"""Megatron's ``--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec`` seam, on CPU.

The translated plugin flags go through Megatron's own parser and ``hybrid_config_from_args``;
Megatron's own ``HybridModelBuilder`` then builds the model from the plugin's spec object.
It must be the model ``build_model`` builds for the same recipe: same layers, same weights
(both are seeded alike), same logits.
"""

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.training.argument_utils import hybrid_config_from_args
from megatron.training.models.hybrid import HybridModelBuilder

from megacpp_mcore.cpu_support import adapt_model_for_cpu
from megacpp_mcore.distributed import seed_everything
from megacpp_mcore.errors import SpecError
from megacpp_mcore.megatron.spec_seam import megacpp_stack_spec
from megacpp_mcore.megatron.translate import translate
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.specs.stack import MegacppHybridStack
from tests.megatron_helpers import parsed_megatron_args

pytestmark = pytest.mark.filterwarnings("ignore:'type' is deprecated:DeprecationWarning")


SEED_R = ["model.recurrent.num_heads=null", "model.recurrent.qk_heads=shared",
          "model.recurrent.in_proj_order=qkvfg", "model.recurrent.skip_scale=per_channel",
          "model.recurrent.norm=whole", "model.recurrent.proj_init=linear_default",
          "model.recurrent.forget_bf16=true"]


@pytest.mark.parametrize("r_form", [[], SEED_R], ids=["per_head_r", "seed_r"])
def test_spec_object_builds_the_same_model_as_build_model(megatron_single_process, r_form):
    recipe = load_recipe("tiny", ["model.seq_length=32", "backend=local", *r_form])
    plan = translate(recipe, "plugin")
    with parsed_megatron_args(plan, ["--use-cpu-initialization"]) as args:
        model_config = hybrid_config_from_args(args)
        assert model_config.hybrid_stack_spec is megacpp_stack_spec
        seed_everything(1234)
        via_spec = HybridModelBuilder(model_config).build_model(
            ProcessGroupCollection.use_mpu_process_groups())
    adapt_model_for_cpu(via_spec)
    seed_everything(1234)
    direct = build_model(recipe.layout, recipe.model, backend="local",
                         precision=recipe.precision)

    assert isinstance(via_spec.decoder, MegacppHybridStack)
    assert via_spec.decoder.layer_letters == "AEMFRA"
    r_mixer = via_spec.decoder.layers[4].mixer
    assert r_mixer.shared_qk == bool(r_form) and r_mixer.in_proj_parts()[3][0] == (
        "f" if r_form else "g")
    assert via_spec.decoder.backend_record == direct.backend_record
    direct_state = direct.state_dict()
    for name, tensor in via_spec.state_dict().items():
        if torch.is_tensor(tensor):
            torch.testing.assert_close(tensor, direct_state[name], msg=name)
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(via_spec(tokens, positions, None),
                                   direct(tokens, positions, None))


def test_spec_object_refuses_a_pattern_that_disagrees(megatron_single_process):
    plan = translate(load_recipe("tiny", ["backend=local"]), "plugin")
    with parsed_megatron_args(plan, ["--use-cpu-initialization"]) as args:
        args.hybrid_layer_pattern = "*EM-**"  # an R layer taken for attention
        with pytest.raises(SpecError, match="does not encode --megacpp-plan"):
            _ = megacpp_stack_spec.submodules


def test_spec_object_needs_megatron_args():
    from megatron.training import global_vars

    from tests.megatron_helpers import own_megatron_globals

    with own_megatron_globals():
        assert global_vars._GLOBAL_ARGS is None
        with pytest.raises(SpecError, match="not initialised"):
            _ = megacpp_stack_spec.params

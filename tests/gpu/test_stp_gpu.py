"""STP on GPUs: the hook's gradients equal the explicit ``loss + weight * stp`` on a real bf16
model on one GPU, and under tensor parallelism 2 with and without sequence parallelism (two
GPUs). ``pytest -m gpu tests/gpu/test_stp_gpu.py``."""

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.settings.config import PrecisionConfig
from tests.compare import rel_err
from tests.distributed_helpers import run_distributed
from tests.stp_helpers import hook_vs_explicit

pytestmark = pytest.mark.gpu

EOD, SEQ, BATCH, MICRO, STEP, WEIGHT = 511, 256, 2, 2, 12, 0.5


def _data():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, EOD, (MICRO, BATCH, SEQ + 1), generator=gen)
    tokens[:, 0, 100] = EOD
    tokens[1, 1, 40] = EOD
    return tokens.cuda()


def _hook_and_explicit(model, layout, layers, gather=None):
    """Parameter gradients through the hook and through the explicit loss; logged STP."""
    via_hook, explicit, _plain, logged, _values = hook_vs_explicit(
        model, layout, layers, _data(), step=STEP, weight=WEIGHT, seed=5, eod_id=EOD,
        triples=32, path="megatron", gather=gather)
    return via_hook, explicit, logged


@pytest.mark.parametrize("pattern,layers", [("AEMFRA", ()), ("AEMFRA", (2, 5))])
def test_hook_equals_explicit_loss_on_one_gpu(megatron_gpu, pattern, layers):
    from megacpp_mcore.distributed import seed_everything
    from megacpp_mcore.model import build_model
    from tests.gpu.test_model_gpu import gpu_model_config

    seed_everything(1234)
    layout = parse_pattern(pattern)
    model = build_model(layout, gpu_model_config(), precision=PrecisionConfig("bf16"))
    via_hook, explicit, logged = _hook_and_explicit(model, layout, layers)
    assert via_hook.keys() == explicit.keys()
    worst = max(rel_err(via_hook[n], explicit[n]) for n in explicit)
    assert worst < 2e-2, worst
    assert 0 < logged["stp_loss"] < 2


def _tp_run(rank, world_size, pattern, sequence_parallel):
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.model import build_model
    from tests.gpu.test_model_gpu import gpu_model_config

    init_process_groups(tensor=2, seed=7)
    layout = parse_pattern(pattern)
    model = build_model(layout, gpu_model_config(), precision=PrecisionConfig("fp32"),
                        sequence_parallel=sequence_parallel)

    def gather(hidden):  # the whole sequence; backward keeps this rank's rows only
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)

    via_hook, explicit, logged = _hook_and_explicit(
        model, layout, (), gather if sequence_parallel else None)
    worst = max(rel_err(via_hook[n], explicit[n]) for n in explicit)
    return worst, logged["stp_loss"]


@pytest.mark.parametrize("pattern,sp", [("AEMF", True), ("AMFA", True), ("AMFA", False)])
def test_hook_equals_explicit_loss_under_tensor_parallel_2(tmp_path, pattern, sp):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_distributed(_tp_run, 2, tmp_path, pattern, sp)
    for worst, _ in results:
        assert worst < 1e-4, worst
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6), "ranks disagree on STP"

"""STP on GPUs: the hook's gradients equal the explicit ``loss + weight * stp`` on a real bf16
model on one GPU, and under tensor parallelism 2 with and without sequence parallelism (two
GPUs). ``pytest -m gpu tests/gpu/test_stp_gpu.py``."""

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.settings.config import PrecisionConfig, StpConfig
from megacpp_mcore.stp import StpHook, sample_seed, stp_loss
from megacpp_mcore.train.hooks import HookContext, HookList
from tests.distributed_helpers import run_distributed
from tests.gpu.conftest import rel_err

pytestmark = pytest.mark.gpu

EOD, SEQ, BATCH, MICRO, STEP, WEIGHT = 511, 256, 2, 2, 12, 0.5


def _data():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, EOD, (MICRO, BATCH, SEQ + 1), generator=gen)
    tokens[:, 0, 100] = EOD
    tokens[1, 1, 40] = EOD
    return tokens.cuda()


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _hook_and_explicit(model, layout, layers, gather=None):
    """Parameter gradients through the hook and through the explicit loss; logged STP."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    data = _data()
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    config = StpConfig(enabled=True, weight=WEIGHT, start_step=10, triples=32, min_gap=2,
                       layers=layers)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / MICRO, device="cuda"))
    hooks = HookList([StpHook(config, seed=5, eod_id=EOD)])
    hooks.install([model], HookContext(num_microbatches=MICRO, layout=layout, path="megatron"))
    hooks.before_step(STEP, [model], None)
    for m in range(MICRO):
        hooks.before_micro_batch({"tokens": data[m, :, :-1]})
        losses = model(data[m, :, :-1], positions, None, labels=data[m, :, 1:])
        (losses.float().mean() / MICRO).backward()
    via_hook = _grads(model)
    logged = hooks.metrics()
    hooks.remove()
    model.zero_grad(set_to_none=True)

    chosen = list(layers) or [layout.depth]
    captured = []
    handles = [layer.register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.decoder.layers if layer.layer_number in chosen]
    for m in range(MICRO):
        captured.clear()
        tokens = data[m, :, :-1]
        losses = model(tokens, positions, None, labels=data[m, :, 1:])
        stp = 0.0
        for hidden in captured:
            full = gather(hidden) if gather is not None else hidden
            gen = torch.Generator(device="cuda").manual_seed(sample_seed(5, STEP, m, 0))
            stp = stp + stp_loss(full.transpose(0, 1), samples=32, min_gap=2,
                                 eod_mask=tokens == EOD, generator=gen)
        ((losses.float().mean() + WEIGHT * stp / len(captured)) / MICRO).backward()
    for handle in handles:
        handle.remove()
    return via_hook, _grads(model), logged


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

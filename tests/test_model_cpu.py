"""build_model on CPU: every family (but G) builds, runs, trains; TP=2 equals TP=1."""

import pytest
import torch

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import ParallelConfig, PrecisionConfig
from megacpp_mcore.settings.sizes import size_problems
from tests.conftest import tiny_model_config
from tests.distributed_helpers import run_distributed

FP32 = PrecisionConfig(params_dtype="fp32")


def _batch(seq=32, vocab=256, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    positions = torch.arange(seq).expand(batch, seq)
    return tokens[:, :-1], positions, tokens[:, 1:]


def test_every_cpu_family_builds_and_trains(megatron_single_process):
    layout = parse_pattern("AEMFRA")
    model = build_model(layout, tiny_model_config(), precision=FP32)
    families = model.backend_record["families"]
    assert set(families) == {"A", "E", "M", "F", "R"}
    assert model.decoder.layer_letters == "AEMFRA"
    assert [type(layer).__name__ for layer in model.decoder.layers] == [
        "TransformerLayer", "MoETransformerLayer", "MambaLayer", "MLPLayer", "MambaLayer",
        "TransformerLayer"]
    tokens, positions, labels = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter takes part in the loss"


def test_g_fails_closed_on_cpu(megatron_single_process):
    with pytest.raises(SpecError, match="G layers 3 cannot be built here"):
        build_model(parse_pattern("AMG"), tiny_model_config(), precision=FP32)


def test_sizes_are_validated(megatron_single_process):
    with pytest.raises(SpecError, match=r"model.num_attention_heads \(4\) must be divisible "
                                        r"by model.num_query_groups \(3\)"):
        build_model(parse_pattern("AF"), tiny_model_config(num_query_groups=3), precision=FP32)


def test_size_rules_name_fields_and_only_check_used_families():
    model = tiny_model_config(num_attention_heads=6)
    problems = size_problems(parse_pattern("A"), model, ParallelConfig(tensor=4))
    assert any("model.num_attention_heads (6) must be divisible by parallel.tensor (4)" in p
               for p in problems)
    assert size_problems(parse_pattern("M"), model, ParallelConfig()) == []
    moe_tp = size_problems(parse_pattern("E"), tiny_model_config(), ParallelConfig(tensor=2))
    assert any("need parallel.sequence_parallel" in p for p in moe_tp)
    mamba = size_problems(parse_pattern("M"), tiny_model_config(), ParallelConfig(tensor=16))
    assert any("Mamba heads" in p for p in mamba) and any("num_groups" in p for p in mamba)
    recurrent = size_problems(parse_pattern("R"), tiny_model_config(), ParallelConfig(tensor=8))
    assert any("model.recurrent.num_heads (4)" in p for p in recurrent)


# --------------------------------------------------------------------------- TP = 2


def _tp_outputs(rank, world_size, pattern):
    """Logits of the same seeded model at TP=1 and at TP=2 (gathered), on both ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megacpp_mcore.distributed import init_process_groups

    tokens, positions, labels = _batch(seq=16)
    results = []
    for tp in (1, 2):
        init_process_groups(tensor=tp, seed=7)
        model = build_model(parse_pattern(pattern), tiny_model_config(seq_length=16),
                            precision=FP32)
        logits = model(tokens, positions, None)
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(group.size())]
        dist.all_gather(parts, logits.contiguous(), group=group)
        loss = model(tokens, positions, None, labels=labels).mean()
        results.append((torch.cat(parts, dim=-1).detach(), loss.item()))
    return results


@pytest.mark.parametrize("pattern", ["AFMR", "R"])
def test_tensor_parallel_2_equals_1(pattern, tmp_path):
    for (tp1, loss1), (tp2, loss2) in run_distributed(_tp_outputs, 2, tmp_path, pattern):
        torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=1e-5)
        assert abs(loss1 - loss2) < 1e-5


def _one_rank_fails_while_the_other_waits(rank, world_size):
    import torch.distributed as dist

    from megacpp_mcore.distributed import init_process_groups

    init_process_groups(seed=1)
    if rank == 1:
        raise ValueError("rank 1 broke before the collective")
    dist.barrier()  # rank 0 waits here for a rank that will never come


def test_a_failing_rank_ends_the_run_instead_of_hanging_the_others(tmp_path):
    """The failure mode that hung every two-GPU test: one rank raises, the other blocks in a
    collective. The run must end at once with the failing rank's traceback."""
    import time

    started = time.time()
    with pytest.raises(AssertionError) as info:
        run_distributed(_one_rank_fails_while_the_other_waits, 2, tmp_path)
    assert "rank 1 failed:" in str(info.value)
    assert "ValueError: rank 1 broke before the collective" in str(info.value)
    assert time.time() - started < 120

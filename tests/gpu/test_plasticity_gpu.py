"""Plasticity under Megatron's own optimizers on one GPU: an intervention changes the model
params, the fp32 main params and the moments together, and is still there after the next
optimizer step (Megatron's main -> model copy does not undo it).

``get_megatron_optimizer`` returns a ``ChainedOptimizer`` (dense + expert members for a model
with E), of ``Float16OptimizerWithFloat16Params`` (bf16) or ``DistributedOptimizer`` (DP=1:
its parameter-to-shard mapping with one shard).
Run: ``pytest -m gpu tests/gpu/test_plasticity_gpu.py``.
"""

import math

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.plasticity.adapter import OptimizerAdapter
from megacpp_mcore.plasticity.dash import DashHook
from megacpp_mcore.plasticity.fire import FireHook
from megacpp_mcore.plasticity.redo import RedoHook
from megacpp_mcore.settings.config import MoEConfig, PrecisionConfig
from megacpp_mcore.train.hooks import HookContext
from tests.compare import rel_err
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.gpu


def _wrap(model, dist_opt: bool, dtype: str):
    """Megatron's DDP around ``model`` and the optimizer Megatron builds for it (Adam)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=dist_opt),
        module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, bf16=dtype == "bf16",
                        params_dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}
                                             .get(dtype, dtype)),
                        use_distributed_optimizer=dist_opt, clip_grad=0.0),
        [ddp])
    return ddp, optimizer


def _megatron(dist_opt: bool, dtype: str = "bf16"):
    from megacpp_mcore.distributed import seed_everything

    seed_everything(1234)
    config = tiny_model_config(moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=64,
                                             grouped_gemm=False, token_dispatcher="alltoall"))
    model = build_model(parse_pattern("AEMF"), config, backend="local",
                        precision=PrecisionConfig(params_dtype=dtype)).cuda()
    return _wrap(model, dist_opt, dtype)


def _step(ddp, optimizer, lr=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (2, 33), generator=gen).cuda()
    positions = torch.arange(32, device="cuda").expand(2, 32)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()
    ddp.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok


def _assert_isometric(w: torch.Tensor, atol: float, what: str):
    singular = torch.linalg.svdvals(w.float())
    scale = math.sqrt(w.shape[0] / w.shape[1])
    assert torch.allclose(singular, torch.full_like(singular, scale), atol=atol), (
        what, singular.min().item(), singular.max().item(), scale)


@pytest.mark.parametrize("dist_opt", [False, True], ids=["float16", "distributed"])
def test_fire_survives_megatrons_step(megatron_gpu, dist_opt):
    ddp, optimizer = _megatron(dist_opt)
    kinds = {type(m).__name__ for m in optimizer.chained_optimizers}
    assert type(optimizer).__name__ == "ChainedOptimizer"
    assert kinds == {"DistributedOptimizer" if dist_opt else "Float16OptimizerWithFloat16Params"}
    # at EP=1 Megatron-Core 0.19.2 keeps routed experts in the dense member: one member
    chained = {id(p) for m in optimizer.chained_optimizers
               for g in m.param_groups for p in g["params"]}
    assert chained, "the chained optimizer holds the model's parameters"
    for seed in range(2):
        _step(ddp, optimizer, seed=seed)
    hook = FireHook([3], mode="all")
    hook.install([ddp], HookContext(path="megatron"))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    hook.before_step(3, [ddp], optimizer)
    adapter = OptimizerAdapter(optimizer)
    for part in hook._parts:
        slot = adapter.slot(part.param)
        index = part.index()
        main = slot.full() if index is None else slot.full()[index]
        _assert_isometric(main, 1e-3, f"main {part.key}")
        state = slot.state
        if state and index is not None and slot.shard is None:
            assert state["exp_avg"][index].abs().sum() == 0
    _step(ddp, optimizer, lr=1e-7, seed=3)
    for part in hook._parts:
        slot = adapter.slot(part.param)
        index = part.index()
        model_w = part.param.detach() if index is None else part.param.detach()[index]
        _assert_isometric(model_w, 2e-2, f"bf16 model param {part.key}")  # bf16 rounding
        main = slot.full() if index is None else slot.full()[index]
        _assert_isometric(main, 2e-3, f"main param {part.key} after a step")


@pytest.mark.parametrize("dist_opt", [False, True], ids=["float16", "distributed"])
def test_dash_and_redo_under_megatrons_optimizers(megatron_gpu, dist_opt):
    ddp, optimizer = _megatron(dist_opt)
    dash, redo = DashHook(every=2, start=2), RedoHook(every=2, start=2, tau=0.5)
    for hook in (dash, redo):
        hook.install([ddp], HookContext(path="megatron"))
    _step(ddp, optimizer, seed=0)
    # torch post-hook timing (as the launcher): after the inner step, main grads present
    for hook in (dash, redo):
        hook.after_step(1, [ddp], optimizer)
    assert dash.ema, "DASH saw the reduced main grads"
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    adapter = OptimizerAdapter(optimizer)
    before = {id(p): adapter.slot(p).full() for p, _ in dash._targets}
    dash.before_step(2, [ddp], optimizer)
    for param, _ in dash._targets:  # rows only shrink, model and main agree
        after = adapter.slot(param).full()
        assert (after.norm(dim=1) <= before[id(param)].norm(dim=1) * (1 + 1e-6)).all()
        torch.testing.assert_close(param.detach().float(), after.to(param.dtype).float())
    redo.before_step(2, [ddp], optimizer)  # after the check: recycled rows are new rows
    [dash_event], [redo_event] = dash.events(), redo.events()
    assert dash_event["touched"] > 0 and redo_event["touched"] > 0
    _step(ddp, optimizer, lr=1e-7, seed=2)
    recycled = [m for m, r in zip(redo.mlps, redo_event["layers"], strict=True)
                if r["recycled"]]
    assert recycled
    for mlp in recycled:  # recycled outgoing columns stay (near) zero after a step
        fc2 = mlp.fc2.detach().float()
        assert fc2.abs().amax(0).min() < 1e-4


# ------------------------------------------------------------------ two GPUs = one GPU


def _two_gpu_run(rank, world_size, layout_kind):
    """Logits and events after one Megatron optimizer step, then FIRE + DASH + ReDo, for the
    same weights and batch: ``{with_hooks: (reference, sharded)}``. ``tp2sp``: TP=1 vs TP=2
    with sequence parallelism; ``dp2``: DP=2 with replicated optimizer state vs the
    distributed optimizer (each rank a shard of the fp32 main params and moments). The pass
    without hooks is the baseline: how far the two layouts drift by rounding alone."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.train.hooks import HookList
    from tests.gpu.test_model_gpu import gpu_model_config
    from tests.gpu.test_tensor_parallel_gpu import _load_shards

    # exactness in fp32: no TF32 (cuDNN allows it by default, e.g. for M's conv1d)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 257), generator=gen).cuda()  # the same on every rank
    positions = torch.arange(256, device="cuda").expand(2, 256)
    out, state = {}, None
    for with_hooks in (False, True):
        results = []
        for sharded in (False, True):
            tp = 2 if sharded and layout_kind == "tp2sp" else 1
            dist_opt = sharded and layout_kind == "dp2"
            init_process_groups(tensor=tp, seed=7)
            model = build_model(parse_pattern("AMF"), gpu_model_config(), backend="local",
                                precision=PrecisionConfig("fp32"),
                                sequence_parallel=tp > 1).cuda()
            if state is None:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()
                         if torch.is_tensor(v)}
            elif tp > 1:
                _load_shards(model, state, parallel_state.get_tensor_model_parallel_rank())
            else:
                model.load_state_dict(state, strict=False)
            ddp, optimizer = _wrap(model, dist_opt, "fp32")
            for group in optimizer.param_groups:  # Adam's first step is lr * sign(grad):
                group["lr"] = 1e-5  # keep rounding-level sign flips out of the comparison
            hooks = HookList([FireHook([2], "all"), DashHook(every=1, start=2),
                              RedoHook(every=1, start=2, tau=0.6)] if with_hooks else [])
            hooks.install([ddp], HookContext(path="megatron"))
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            ddp(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()
            ddp.finish_grad_sync()
            assert optimizer.step()[0]
            hooks.after_step(1, [ddp], optimizer)
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            hooks.before_step(2, [ddp], optimizer)
            with torch.no_grad():
                logits = ddp(tokens[:, :-1], positions, None)
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(logits) for _ in range(group.size())]
            dist.all_gather(parts, logits.contiguous(), group=group)
            events = [{k: v for k, v in e.items() if k != "seconds"} for e in hooks.events()]
            hooks.remove()
            results.append((torch.cat(parts, dim=-1).cpu(), events))
        out[with_hooks] = results
    return out


@pytest.mark.parametrize("layout_kind", ["tp2sp", "dp2"])
def test_two_gpu_layouts_equal_one_gpu(tmp_path, layout_kind):
    """The same weights and batch: TP=2+SP, and the distributed optimizer's DP=2 shards,
    decide and write exactly what one unsharded copy does."""
    from tests.distributed_helpers import run_distributed

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")

    def rel(pair):
        (reference, _), (sharded, _) = pair
        return rel_err(sharded, reference)

    for out in run_distributed(_two_gpu_run, 2, tmp_path, layout_kind):
        (_, events1), (_, events2) = out[True]
        assert [e["kind"] for e in events1] == ["fire", "dash", "redo"]
        assert events2 == events1
        baseline, error = rel(out[False]), rel(out[True])
        print(layout_kind, "logits rel err: one step", baseline, "then FIRE + DASH + ReDo",
              error)
        assert baseline < 1e-4 and error < 1e-4

"""Plasticity is exact under sharding: tensor parallelism (Megatron layers, gloo TP=2),
DTensor shards (FSDP2-style), and the distributed optimizer's flat shards (Megatron's own
range-building code on synthetic buffers); every rank decides the same."""

from types import SimpleNamespace

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.plasticity.adapter import distributed_slot
from megacpp_mcore.settings.config import PrecisionConfig
from tests.conftest import tiny_model_config
from tests.distributed_helpers import run_distributed

FP32 = PrecisionConfig(params_dtype="fp32")


# --------------------------------------------------------------------------- TP = 2


def _tp_plasticity(rank, world_size, pattern):
    """Logits after FIRE + DASH + ReDo on the same seeded model at TP=1 and TP=2."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.plasticity.dash import DashHook
    from megacpp_mcore.plasticity.fire import FireHook
    from megacpp_mcore.plasticity.redo import RedoHook
    from megacpp_mcore.train.hooks import HookContext, HookList

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 17), generator=gen)
    positions = torch.arange(16).expand(2, 16)
    results = []
    for tp in (1, 2):
        init_process_groups(tensor=tp, seed=7)
        model = build_model(parse_pattern(pattern), tiny_model_config(seq_length=16),
                            precision=FP32)
        # SGD: a step linear in the gradients, so TP=1 and TP=2 stay equal to rounding
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        hooks = HookList([FireHook([2], "all"), DashHook(every=1, start=2),
                          RedoHook(every=1, start=2, tau=0.6)])
        hooks.install([model], HookContext())
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
        hooks.after_step(1, [model], optimizer)
        optimizer.zero_grad(set_to_none=True)
        hooks.before_step(2, [model], optimizer)
        with torch.no_grad():
            logits = model(tokens[:, :-1], positions, None)
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(group.size())]
        dist.all_gather(parts, logits.contiguous(), group=group)
        events = [{k: v for k, v in e.items() if k != "seconds"} for e in hooks.events()]
        hooks.remove()
        results.append((torch.cat(parts, dim=-1), events))
    return results


@pytest.mark.slow
def test_tensor_parallel_2_equals_1(tmp_path):
    for (tp1, events1), (tp2, events2) in run_distributed(_tp_plasticity, 2, tmp_path, "AFMR"):
        assert [e["kind"] for e in events1] == ["fire", "dash", "redo"]
        redo = events1[2]["layers"]
        assert any(r["recycled"] for r in redo), "the test must recycle something"
        assert events2 == events1  # the same decisions (touched rows, dormant units)
        torch.testing.assert_close(tp2, tp1, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- DTensor


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _dtensor_plasticity(rank, world_size, placement_dim):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from megacpp_mcore.plasticity import sharding
    from megacpp_mcore.plasticity.adapter import OptimizerAdapter
    from megacpp_mcore.plasticity.dash import shrink_rows_sharded
    from megacpp_mcore.plasticity.fire import fire_parts
    from megacpp_mcore.plasticity.parts import Part

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(5)
    w, g = torch.randn(64, 48, generator=gen), torch.randn(64, 48, generator=gen)
    plain = torch.nn.Parameter(w.clone())
    shard = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(placement_dim)]))
    results = []
    for param in (plain, shard):
        opt = torch.optim.AdamW([param], lr=1e-2)
        param.grad = g.clone() if param is plain else distribute_tensor(
            g.clone(), mesh, [Shard(placement_dim)])
        opt.step()
        adapter = OptimizerAdapter(opt)
        part = Part("gate", param, ((0, 16), (40, 56)), None, None, "F", 1)
        digests = [d for _, d in fire_parts([part], adapter, "exact")]
        slot = adapter.slot(param)
        new, scale = shrink_rows_sharded(slot.full(), slot.assemble(slot.grad()), 0.3, None,
                                         None)
        slot.write(new)
        digests.append(sharding.digest(scale))
        sharding.assert_agree("dtensor test", digests, [dist.group.WORLD])
        results.append((_whole(param.detach()).clone(),
                        _whole(opt.state[param]["exp_avg"]).clone(), digests))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("placement_dim", [0, 1])
def test_dtensor_shards_equal_the_whole_tensor(tmp_path, placement_dim):
    for plain, sharded in run_distributed(_dtensor_plasticity, 2, tmp_path, placement_dim):
        torch.testing.assert_close(sharded[0], plain[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sharded[1], plain[1], rtol=0, atol=0)
        assert torch.equal(plain[1][16:40], sharded[1][16:40]) and plain[1][16:40].abs().sum()
        assert plain[1][:16].abs().sum() == 0  # the FIRE'd rows' moments were reset


# --------------------------------------------------------------------------- distributed optimizer


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _buffer(params, dp_rank, dp_size):
    """A grad buffer as Megatron lays it out: params packed into buckets, each bucket padded
    to a multiple of the data-parallel size."""
    index_map, buckets, offset = {}, [], 0
    for bucket_id, bucket_params in enumerate((params[:2], params[2:])):
        start = offset
        for p in bucket_params:
            index_map[p] = (offset, offset + p.numel(), bucket_id)
            offset += p.numel()
        offset = start + -(-(offset - start) // dp_size) * dp_size
        buckets.append(SimpleNamespace(grad_data=torch.empty(offset - start), offset=start))
    return SimpleNamespace(param_index_map=index_map, buckets=buckets,
                           data_parallel_group=_Group(dp_rank, dp_size),
                           num_optimizer_shards=None, param_dtype=torch.bfloat16,
                           grad_dtype=torch.float32)


def _member(params, dp_rank, dp_size):
    """The fields of a DistributedOptimizer that locate shards, from Megatron's own code."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D

    gbuf_ranges = [D._build_gbuf_range_map(_buffer(params, dp_rank, dp_size))]
    gbuf_map = D._build_model_param_gbuf_map(gbuf_ranges)
    group_map, group_ranges = D._build_optimizer_group_ranges([{"params": params}], gbuf_ranges)
    mains = []
    for p in group_ranges[0]["params"]:
        gi, dtype, bi = gbuf_map[p]
        r = gbuf_ranges[gi][dtype][bi]["param_map"][p]["param"]
        mains.append(torch.nn.Parameter(p.detach().float().view(-1)[r.start:r.end].clone()))
    # lr 0: the step fills the moments and leaves the main shards equal to the params
    inner = torch.optim.AdamW(mains or [torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    for main in mains:
        main.grad = torch.randn_like(main)
    inner.step()
    return SimpleNamespace(model_param_gbuf_map=gbuf_map, gbuf_ranges=gbuf_ranges,
                           model_param_group_index_map=group_map, optimizer=inner)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_distributed_optimizer_shards_tile_each_param_exactly(dp_size):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen))
              for s in ((6, 5), (7, 3), (4, 4), (10,))]
    members = [_member(params, r, dp_size) for r in range(dp_size)]
    for p in params:
        slots = [distributed_slot(m, p, None) for m in members]
        covered = torch.zeros(p.numel())
        for slot in slots:
            covered[slot.shard[0]:slot.shard[1]] += 1
        assert torch.equal(covered, torch.ones(p.numel()))  # every element on one rank
        # the whole param rebuilt from the shards (the data-parallel sum, done by hand)
        torch.testing.assert_close(sum(s.assemble(s.main) for s in slots), p.detach())
        new = torch.randn(p.shape, generator=gen)
        reset = torch.rand(p.shape, generator=gen) < 0.3
        before = [{k: v.clone() for k, v in s.state.items()} for s in slots]
        for slot in slots:
            slot.write(new, reset)
        assert torch.equal(p.detach(), new)
        for slot, old in zip(slots, before, strict=True):
            if slot.main is None:
                continue
            a, b = slot.shard
            assert torch.equal(slot.main.detach(), new.view(-1)[a:b])
            mask = reset.view(-1)[a:b]
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(slot.state[k][mask], torch.zeros_like(slot.state[k][mask]))
                assert torch.equal(slot.state[k][~mask], old[k][~mask])


# --------------------------------------------------------------------------- EP = 2


def _ep_events(rank, world_size):
    """FIRE + DASH + ReDo events of a model with routed experts at EP=1 and EP=2.

    Megatron's MoE forward at EP>1 needs CUDA, so the gradients are drawn per parameter
    name (the same on every rank); ReDo sees no activity, which must not leave one rank
    out of the event's collective.
    """
    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.plasticity.dash import DashHook
    from megacpp_mcore.plasticity.fire import FireHook
    from megacpp_mcore.plasticity.redo import RedoHook
    from megacpp_mcore.train.hooks import HookContext, HookList

    results = []
    for ep in (1, 2):
        init_process_groups(expert=ep, seed=7)
        model = build_model(parse_pattern("AE"), tiny_model_config(seq_length=16),
                            precision=FP32)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        hooks = HookList([FireHook([2], "all"), DashHook(every=1, start=2),
                          RedoHook(every=1, start=2)])
        hooks.install([model], HookContext())
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(len(name))
            param.grad = torch.randn(param.shape, generator=gen)
        optimizer.step()
        hooks.after_step(1, [model], optimizer)
        hooks.before_step(2, [model], optimizer)
        results.append({e["kind"]: e for e in hooks.events()})
        hooks.remove()
    return results


@pytest.mark.slow
def test_expert_parallel_events_count_every_expert(tmp_path):
    """At EP=2 each rank holds half the experts; an event still counts the whole model."""
    for ep1, ep2 in run_distributed(_ep_events, 2, tmp_path):
        assert ep1["fire"]["touched"] == ep2["fire"]["touched"] > 0
        assert ep1["fire"]["elements"] == ep2["fire"]["elements"]
        assert ep1["dash"]["rows"] == ep2["dash"]["rows"] > 0
        assert "redo" not in ep1 and "redo" not in ep2  # nothing observed: no check

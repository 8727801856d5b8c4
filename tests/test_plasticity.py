"""Plasticity tools on whole tensors (against naive oracles), the declared parts of fused
weights, and interventions on a real model under torch AdamW: selective state reset, and the
intervention survives the next optimizer step."""

import math

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.plasticity.adapter import OptimizerAdapter
from megacpp_mcore.plasticity.dash import shrink_rows, shrink_rows_reference
from megacpp_mcore.plasticity.fire import FireHook, fire_parts, isometry, isometry_reference
from megacpp_mcore.plasticity.parts import fire_targets, walk_parts
from megacpp_mcore.plasticity.redo import RedoHook, dormant_units, dormant_units_reference
from megacpp_mcore.settings.config import PrecisionConfig
from megacpp_mcore.train.hooks import HookContext
from tests.conftest import tiny_model_config
from tests.megatron_helpers import mla_attention_on_cpu

FP32 = PrecisionConfig(params_dtype="fp32")


# --------------------------------------------------------------------------- FIRE


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_exact_fire_is_the_scaled_isometry(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = isometry(w, "exact")
    scale = math.sqrt(shape[0] / shape[1])
    singular = torch.linalg.svdvals(out)
    assert torch.allclose(singular, torch.full_like(singular, scale), atol=1e-3)
    torch.testing.assert_close(out.double(), isometry_reference(w, "exact"), atol=1e-4,
                               rtol=0)


def test_paper_fire_matches_the_reference_recipe_and_is_not_an_isometry():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    out = isometry(w, "paper")
    torch.testing.assert_close(out.double(), isometry_reference(w, "paper"), atol=1e-5, rtol=0)
    # five cubic steps from a Frobenius-normalised start stay far from the isometry
    assert torch.linalg.svdvals(out).median() < 0.5


def test_fire_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="accepted: exact, paper"):
        isometry(torch.eye(2), "quintic")


# --------------------------------------------------------------------------- DASH


def test_dash_matches_the_formula_on_hand_built_rows():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    g = torch.tensor([[-5.0, 0.0],   # aligned with descent: cos 1 -> kept
                      [2.0, 0.0],    # along the row itself: cos -1 -> lam
                      [0.0, 1.0],    # orthogonal: cos 0 -> lam
                      [0.0, 0.0],    # no gradient: kept
                      [-3.0, 0.0],   # cos 0.6 -> 0.6
                      [1.0, 1.0]])   # zero row: kept (nothing to shrink)
    shrunk, scale = shrink_rows(w, g, lam=0.3)
    assert torch.allclose(scale, torch.tensor([1.0, 0.3, 0.3, 1.0, 0.6, 1.0]))
    torch.testing.assert_close(shrunk, w * scale[:, None])
    ref, ref_scale = shrink_rows_reference(w, g, lam=0.3)
    torch.testing.assert_close(shrunk.double(), ref)
    torch.testing.assert_close(scale.double(), ref_scale)


def test_dash_matches_the_reference_on_random_rows():
    gen = torch.Generator().manual_seed(2)
    w, g = torch.randn(40, 24, generator=gen), torch.randn(40, 24, generator=gen)
    shrunk, _ = shrink_rows(w, g, lam=0.2)
    ref, _ = shrink_rows_reference(w, g, lam=0.2)
    torch.testing.assert_close(shrunk.double(), ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- ReDo


def test_redo_finds_planted_dead_units_and_only_those():
    activity = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    dead = [3, 17, 40]
    activity[dead] = 0.0
    activity[50] = 0.05  # low but above tau * mean (about 0.025)
    mask = dormant_units(activity, tau=0.025)
    assert torch.nonzero(mask).flatten().tolist() == dead
    assert mask.tolist() == dormant_units_reference(activity.tolist(), 0.025)


# --------------------------------------------------------------------------- parts


def _model(pattern="AEMFRA", **overrides):
    return build_model(parse_pattern(pattern), tiny_model_config(**overrides), precision=FP32)


def test_qkv_parts_are_megatrons_own_split(megatron_single_process):
    model = _model("A")
    attention = model.decoder.layers[0].self_attention
    parts = {p.name: p for p in walk_parts([model])[0] if p.family == "A"}
    x = torch.randn(5, 2, 64)
    q, k, v = attention.get_query_key_value_tensors(x)[:3]
    weight = attention.linear_qkv.weight
    for name, ref in (("query", q), ("key", k), ("value", v)):
        rows = weight[parts[name].index()]
        torch.testing.assert_close(x @ rows.T, ref.reshape(5, 2, -1))
    assert parts["out"].tp_dim == 1 and parts["query"].tp_dim == 0


def test_every_family_declares_its_parts(megatron_single_process):
    model = _model()
    parts, skipped = walk_parts([model])
    names = {(p.family, p.name) for p in parts}
    assert {("A", "query"), ("A", "key"), ("A", "value"), ("A", "out"), ("E", "gate"),
            ("E", "up"), ("E", "down"), ("F", "gate"), ("F", "down"), ("M", "z"), ("M", "x"),
            ("M", "B"), ("M", "C"), ("M", "dt"), ("M", "out"), ("R", "q"), ("R", "f"),
            ("R", "state")} <= names
    assert skipped == []
    experts = {p.expert for p in parts if p.family == "E"}
    assert experts == {0, 1, 2, 3}
    # every row of a fused weight belongs to exactly one part
    for param in {id(p.param): p.param for p in parts if p.rows is not None}.values():
        rows = torch.cat([p.index() for p in parts if p.param is param])
        assert sorted(rows.tolist()) == list(range(param.shape[0]))
    embedding = model.embedding.word_embeddings.weight
    assert all(p.param is not embedding and p.param is not model.output_layer.weight
               for p in parts)


def test_fire_target_modes(megatron_single_process):
    model = _model()
    ctx = {(p.family, p.name) for p in fire_targets([model], "context_extension")}
    assert ctx == {("A", "query"), ("A", "key")}
    att = {p.name for p in fire_targets([model], "attention")}
    assert att == {"query", "key", "value", "out"}
    everything = {p.name for p in fire_targets([model], "all")}
    assert not everything & {"state", "dt", "f"}
    assert "state" in {p.name for p in fire_targets([model], "all", include_state=True)}


def test_dash_leaves_the_rows_of_gate_parts(megatron_single_process):
    """M's in_proj holds z | x | B | C | dt: DASH shrinks the first four, never dt (it sets
    the decay rates), and counts only the rows it may shrink."""
    from megacpp_mcore.plasticity.dash import DashHook

    model = _model("M")
    mixer = model.decoder.layers[0].mixer
    dt = next(p for p in walk_parts([model])[0] if p.name == "dt").index()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for param in model.parameters():  # a gradient along every row: DASH shrinks each
        param.grad = param.detach().clone()
    hook = DashHook(every=1, start=2)
    hook.install([model], HookContext())
    hook.after_step(1, [model], optimizer)
    before = mixer.in_proj.weight.detach().clone()
    hook.before_step(2, [model], optimizer)
    [event] = hook.events()
    after = mixer.in_proj.weight.detach()
    torch.testing.assert_close(after[dt], before[dt], rtol=0, atol=0)
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[dt] = False
    assert (after[others].norm(dim=1) < before[others].norm(dim=1)).all()
    assert event["rows"] == sum(p.param.shape[0] if p.rows is None else len(p.index())
                                for p in hook._parts)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_mla_declares_query_key_value_parts(megatron_single_process, monkeypatch,
                                            q_lora_rank):
    attention = mla_attention_on_cpu(monkeypatch, q_lora_rank)
    parts = {p.name: p for p in walk_parts([attention])[0]}
    expected = {"query", "kv_down", "key", "value", "out"} | (
        {"query_down"} if q_lora_rank else set())
    assert set(parts) == expected and all(p.family == "A" for p in parts.values())
    assert parts["query"].global_shape() == (4 * (8 + 4), q_lora_rank or 64)
    assert parts["key"].global_shape() == (4 * 8, 16)  # per head 8 key rows of 8 + 6
    assert parts["value"].global_shape() == (4 * 6, 16)
    assert parts["kv_down"].global_shape() == (16 + 4, 64)
    kv_up = attention.linear_kv_up_proj.weight.view(4, 8 + 6, 16)
    torch.testing.assert_close(kv_up[:, :8].reshape(-1, 16),
                               kv_up.reshape(-1, 16)[parts["key"].index()])
    ctx = {p.name for p in fire_targets([attention], "context_extension")}
    assert ctx == {"query", "key"} | ({"query_down"} if q_lora_rank else set())


def test_fire_on_mla_touches_only_queries_and_keys(megatron_single_process, monkeypatch):
    attention = mla_attention_on_cpu(monkeypatch)
    optimizer = torch.optim.AdamW(attention.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in attention.named_parameters()}
    hook = FireHook([1], mode="context_extension")
    hook.install([attention], HookContext())
    hook.before_step(1, [attention], optimizer)
    [event] = hook.events()
    assert event["touched"] == 3  # query_down, query, key
    for part in hook._parts:
        index = part.index()
        w = part.param.detach() if index is None else part.param.detach()[index]
        singular = torch.linalg.svdvals(w.double())
        scale = math.sqrt(w.shape[0] / w.shape[1])
        assert (singular - scale).abs().max() < 1e-3, part.name
    kv_up = attention.linear_kv_up_proj.weight.detach().view(4, 14, 16)
    torch.testing.assert_close(kv_up[:, 8:], before["linear_kv_up_proj.weight"].view(4, 14, 16)
                               [:, 8:], rtol=0, atol=0)  # the values' rows are untouched
    for name in ("linear_kv_down_proj.weight", "linear_proj.weight"):
        torch.testing.assert_close(dict(attention.named_parameters())[name].detach(),
                                   before[name], rtol=0, atol=0)


# --------------------------------------------------------------------------- on a model


def _trained(steps=2, lr=1e-2):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 33), generator=gen)
    positions = torch.arange(32).expand(2, 32)
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
    return model, optimizer, (tokens, positions)


def _snapshot(model, optimizer):
    return {name: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
            for name, p in model.named_parameters()}


def test_fire_resets_exactly_the_touched_state(megatron_single_process):
    model, optimizer, _ = _trained()
    before = _snapshot(model, optimizer)
    parts = fire_targets([model], "context_extension")
    fire_parts(parts, OptimizerAdapter(optimizer), "exact")
    touched = {}
    for p in parts:
        touched.setdefault(id(p.param), []).append(p.index())
    for name, param in model.named_parameters():
        old_param, old_state = before[name]
        state = optimizer.state[param]
        rows = touched.get(id(param))
        if rows is None:  # untouched: bit-identical, param and state
            assert torch.equal(param, old_param), name
            assert all(torch.equal(state[k], old_state[k]) for k in old_state), name
            continue
        rows = torch.cat(rows)
        keep = torch.ones(param.shape[0], dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(param[keep], old_param[keep]), name  # value rows untouched
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[k][rows], torch.zeros_like(state[k][rows])), name
            assert torch.equal(state[k][keep], old_state[k][keep]), name
        assert torch.equal(state["step"], old_state["step"])
    # the query and key parts are (scaled) isometries now
    for p in parts:
        singular = torch.linalg.svdvals(p.param[p.index()].detach())
        scale = math.sqrt(p.global_shape()[0] / p.global_shape()[1])
        assert torch.allclose(singular, torch.full_like(singular, scale), atol=1e-3)


def test_fire_survives_the_next_optimizer_step(megatron_single_process):
    model, optimizer, (tokens, positions) = _trained()
    hook = FireHook([3], mode="all")
    hook.install([model], HookContext())
    optimizer.zero_grad(set_to_none=True)
    hook.before_step(3, [model], optimizer)
    for group in optimizer.param_groups:
        group["lr"] = 1e-7
    model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
    optimizer.step()
    [event] = hook.events()
    # every part of AEMFRA in mode all: the count the golden tools run records (33)
    assert event["kind"] == "fire" and event["touched"] == len(hook._parts) == 33
    for p in hook._parts:
        w = p.param.detach() if p.index() is None else p.param.detach()[p.index()]
        singular = torch.linalg.svdvals(w)
        scale = math.sqrt(w.shape[0] / w.shape[1])
        assert torch.allclose(singular, torch.full_like(singular, scale), atol=1e-3), p.key


def test_redo_recycles_planted_dead_units(megatron_single_process):
    model, optimizer, (tokens, positions) = _trained(steps=1)
    mlp = model.decoder.layers[3].mlp  # the F layer
    dead = [5, 77]
    with torch.no_grad():  # kill two units: zero their gate and up rows
        for unit in dead:
            mlp.linear_fc1.weight[unit] = 0
            mlp.linear_fc1.weight[128 + unit] = 0
    hook = RedoHook(every=1, start=2, tau=0.0)
    hook.install([model], HookContext())
    optimizer.zero_grad()
    model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
    optimizer.step()
    hook.after_step(1, [model], optimizer)
    before = _snapshot(model, optimizer)
    hook.before_step(2, [model], optimizer)
    [event] = hook.events()
    f_layer = [r for r in event["layers"] if r["family"] == "F"]
    assert f_layer == [{"layer": 4, "family": "F", "expert": None, "checked": 128,
                        "dormant": 2, "recycled": 2}]
    fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    for unit in dead:
        assert fc1[unit].abs().sum() > 0 and fc1[128 + unit].abs().sum() > 0
        assert torch.equal(fc2[:, unit], torch.zeros_like(fc2[:, unit]))
        assert optimizer.state[fc1]["exp_avg"][unit].abs().sum() == 0
        assert optimizer.state[fc2]["exp_avg_sq"][:, unit].abs().sum() == 0
    alive = [i for i in range(128) if i not in dead]
    old_fc1 = before[next(n for n, p in model.named_parameters() if p is fc1)]
    assert torch.equal(fc1[alive], old_fc1[0][alive])
    assert torch.equal(optimizer.state[fc1]["exp_avg"][alive], old_fc1[1]["exp_avg"][alive])


def test_exact_fire_polishes_an_inaccurate_svd(monkeypatch):
    """An SVD whose factors are 2e-3 off orthogonal (what fp32 gave at 4096 wide on an
    H200) still yields singular values within 1e-4 of the scale after the fp64 polish."""
    from megacpp_mcore.plasticity import fire

    true_svd = torch.linalg.svd

    def noisy_svd(w, full_matrices=False):
        u, s, vh = true_svd(w, full_matrices=full_matrices)
        gen = torch.Generator().manual_seed(0)
        return u + 2e-3 / u.shape[0] ** 0.5 * torch.randn(u.shape, generator=gen), s, vh

    monkeypatch.setattr(fire.torch.linalg, "svd", noisy_svd)
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    raw = noisy_svd(w)
    assert (torch.linalg.svdvals(raw[0] @ raw[2]) - 1).abs().max() > 1e-3  # the noise bites
    singular = torch.linalg.svdvals(fire.isometry(w, "exact").double())
    assert (singular - 2 ** 0.5).abs().max() < 1e-4


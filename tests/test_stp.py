"""STP: the loss on known trajectories, sampling rules, gate and ramp, gradients through the
hook equal the explicit ``loss + weight * stp``, the sequence split over 2 gloo ranks, and the
recipe / flags / translation plumbing."""

import math
from dataclasses import replace

import pytest
import torch

from megacpp_mcore.errors import RecipeError, SpecError, TranslateError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.settings.config import PrecisionConfig, StpConfig
from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.stp import (
    SequenceSplit,
    StpHook,
    gather_points,
    sample_points,
    sample_seed,
    split_positions,
    stp_loss,
    stp_weight,
    straightness,
)
from megacpp_mcore.train.hooks import HookContext
from tests.conftest import tiny_model_config
from tests.distributed_helpers import run_distributed
from tests.stp_helpers import grads, hook_vs_explicit


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("form", ["triple", "span"])
def test_straight_trajectory_gives_zero(form):
    direction = torch.randn(32)
    speed = torch.rand(3, 80).cumsum(1)  # monotone, uneven speed along one line
    hidden = torch.randn(32) + speed[..., None] * direction
    assert stp_loss(hidden, samples=64, form=form, generator=_gen()).item() < 1e-6


def test_curved_trajectory_gives_the_turning_angle():
    # points on a circle, gap g: the angle between consecutive chords is g * step angle
    seq, step_angle = 40, 2 * math.pi / 200
    theta = torch.arange(seq) * step_angle
    hidden = torch.zeros(1, seq, 8)
    hidden[0, :, 0], hidden[0, :, 1] = torch.cos(theta), torch.sin(theta)
    points = torch.tensor([[[2, 7, 12, 12], [0, 10, 20, 20]]])
    rows = gather_points(hidden, points)
    loss = straightness(rows, torch.ones(1, 2))
    # chord (s, r) and chord (r, t) turn by (t - s) / 2 * step_angle
    expected = ((1 - math.cos(5 * step_angle)) + (1 - math.cos(10 * step_angle))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert 0 < stp_loss(hidden, samples=64, generator=_gen()).item() < 1


def test_random_trajectory_is_far_from_straight():
    # independent points: cos(h_t - h_r, h_r - h_s) has mean -1/2, so the loss is about 1.5
    loss = stp_loss(torch.randn(4, 256, 64), samples=512, generator=_gen()).item()
    assert loss == pytest.approx(1.5, abs=0.05)


def test_span_form_compares_the_span_with_the_rest():
    hidden = torch.randn(1, 10, 6)
    points = torch.tensor([[[0, 3, 6, 9]]])
    u = (hidden[0, 3] - hidden[0, 0]) + (hidden[0, 9] - hidden[0, 6])
    v = hidden[0, 6] - hidden[0, 3]
    expected = 1 - torch.nn.functional.cosine_similarity(u, v, dim=0)
    loss = straightness(gather_points(hidden, points), torch.ones(1, 1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("form", ["triple", "span"])
def test_samples_stay_inside_one_document(form):
    batch, seq, gap = 3, 64, 3
    eod = torch.zeros(batch, seq, dtype=torch.bool)
    eod[0, [9, 30]] = True
    eod[1, 50] = True
    eod[2, 4] = True  # a short first document (5 positions) that cannot hold a sample
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, 56:] = False  # padding at the end of sequence 1
    points, weights = sample_points(batch, seq, samples=400, min_gap=gap, form=form,
                                    eod_mask=eod, valid_mask=valid, generator=_gen(1))
    assert weights.eq(1).all()
    doc = torch.cumsum(eod.long(), 1) - eod.long()  # an EOD closes its own document
    for b in range(batch):
        ids = doc[b][points[b]]
        assert (ids == ids[:, :1]).all(), "a sample crosses an end-of-document position"
        assert valid[b][points[b]].all(), "a sample touches padding"
        p = points[b]
        if form == "triple":
            assert ((p[:, 1] - p[:, 0]) >= gap).all() and ((p[:, 2] - p[:, 1]) >= gap).all()
            assert (p[:, 3] == p[:, 2]).all()
        else:
            assert ((p[:, 2] - p[:, 1]) >= gap).all()
            assert ((p[:, 1] - p[:, 0]) + (p[:, 3] - p[:, 2]) >= gap).all()
    assert not (doc[2][points[2]] == 0).any(), "the too-short document was sampled"


def test_sequences_without_room_get_zero_weight():
    eod = torch.ones(2, 16, dtype=torch.bool)  # every token ends a document
    eod[1] = False
    _points, weights = sample_points(2, 16, samples=8, min_gap=1, eod_mask=eod,
                                    generator=_gen())
    assert weights[0].eq(0).all() and weights[1].eq(1).all()
    assert stp_loss(torch.randn(1, 16, 4), samples=4, eod_mask=eod[:1],
                    generator=_gen()).item() == 0.0


def test_sampling_is_seeded_by_step_micro_batch_and_data_parallel_rank():
    def draw(*key):
        return sample_points(2, 128, samples=16, generator=_gen(sample_seed(*key)))[0]

    assert torch.equal(draw(1, 5, 0, 0), draw(1, 5, 0, 0))
    for other in [(1, 6, 0, 0), (1, 5, 1, 0), (1, 5, 0, 1), (2, 5, 0, 0)]:
        assert not torch.equal(draw(1, 5, 0, 0), draw(*other))


def test_bad_sampling_arguments_are_refused():
    with pytest.raises(SpecError, match="accepted: triple, span"):
        sample_points(1, 8, samples=2, form="curvature")
    with pytest.raises(SpecError, match="min_gap >= 1"):
        sample_points(1, 8, samples=2, min_gap=0)


# --------------------------------------------------------------------------- gate and ramp


def test_gate_and_ramp():
    config = StpConfig(enabled=True, weight=0.2, start_step=10, ramp_steps=4)
    weights = [stp_weight(config, step) for step in range(1, 16)]
    assert weights[:9] == [0.0] * 9
    assert weights[9:13] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert weights[13:] == pytest.approx([0.2, 0.2])
    assert stp_weight(replace(config, ramp_steps=0), 10) == 0.2
    assert stp_weight(replace(config, enabled=False), 12) == 0.0


# --------------------------------------------------------------------------- the sequence split


def test_split_positions_follow_megatrons_layouts():
    # context parallel 2: chunks of S/4, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert split_positions(4, cp_rank=0, cp_size=2).tolist() == [0, 1, 6, 7]
    assert split_positions(4, cp_rank=1, cp_size=2).tolist() == [2, 3, 4, 5]
    # sequence parallel 2 (contiguous halves)
    assert split_positions(4, tp_rank=1, tp_size=2).tolist() == [4, 5, 6, 7]
    # both: the CP-local sequence [2, 3, 4, 5] is cut in halves across TP
    assert split_positions(2, tp_rank=1, tp_size=2, cp_rank=1, cp_size=2).tolist() == [4, 5]
    every = torch.cat([split_positions(2, tp_rank=t, tp_size=2, cp_rank=c, cp_size=2)
                       for c in range(2) for t in range(2)])
    assert sorted(every.tolist()) == list(range(8))


def _split_run(rank, world_size, layout_kind):
    """On each rank: the loss and the slice's gradient from the split path, and the
    reference loss and gradient of the unsplit run (computed on every rank)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    batch, seq, dim = 2, 48, 16
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(batch, seq, dim, generator=gen)
    full = full + torch.linspace(0, 3, seq)[None, :, None]  # some structure
    eod = torch.zeros(batch, seq, dtype=torch.bool)
    eod[0, 17] = True
    eod[1, 30] = True
    seed = sample_seed(1234, 3, 1, 0)
    ref_input = full.clone().requires_grad_()
    reference = stp_loss(ref_input, samples=32, min_gap=2, eod_mask=eod,
                         generator=torch.Generator().manual_seed(seed))
    reference.backward()
    if layout_kind == "cp":
        positions = split_positions(seq // world_size, cp_rank=rank, cp_size=world_size)
    else:
        positions = split_positions(seq // world_size, tp_rank=rank, tp_size=world_size)
    local = full[:, positions].clone().requires_grad_()
    split = SequenceSplit(positions, seq, [dist.group.WORLD])
    loss = stp_loss(local, samples=32, min_gap=2, eod_mask=eod, split=split,
                    generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return (loss.item(), reference.item(), positions, local.grad,
            ref_input.grad[:, positions])


@pytest.mark.parametrize("layout_kind", ["cp", "sp"])
def test_sequence_split_over_two_ranks_matches_the_unsplit_run(tmp_path, layout_kind):
    results = run_distributed(_split_run, 2, tmp_path, layout_kind)
    for loss, reference, _positions, grad, ref_grad in results:
        assert loss == pytest.approx(reference, rel=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert any(r[3].abs().sum() > 0 for r in results)


# --------------------------------------------------------------------------- gradients via the hook


def _micro_batches(n, batch=2, seq=32, vocab=256):
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab - 1, (n, batch, seq + 1), generator=gen)
    tokens[0, 0, 10] = vocab - 1  # an end-of-document token in one sequence
    return tokens


def _hook_vs_explicit(model, layout, layers):
    return hook_vs_explicit(model, layout, layers, _micro_batches(2), step=7, weight=0.5,
                            seed=99, eod_id=255, triples=16)


def _assert_same_grads(via_hook, explicit, plain):
    assert via_hook.keys() == explicit.keys()
    for name in explicit:
        torch.testing.assert_close(via_hook[name], explicit[name], rtol=1e-5, atol=1e-7,
                                   msg=name)
    # the STP term really changed the gradients (the test would notice a lost injection)
    assert any(not torch.allclose(plain[n], explicit[n]) for n in explicit)


@pytest.mark.parametrize("pattern,layers", [("AEMF", (2, 4)), ("AMFA", ())])
def test_hook_gradients_equal_the_explicit_loss(megatron_single_process, pattern, layers):
    from megacpp_mcore.model import build_model

    torch.manual_seed(0)
    layout = parse_pattern(pattern)
    model = build_model(layout, tiny_model_config(), precision=PrecisionConfig("fp32"))
    via_hook, explicit, plain, logged, values = _hook_vs_explicit(model, layout, layers)
    _assert_same_grads(via_hook, explicit, plain)
    assert logged["stp_loss"] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert logged["stp_weight"] == 0.5


def _tp2_hook_run(rank, world_size):
    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.model import build_model

    init_process_groups(tensor=2, seed=7)
    layout = parse_pattern("AMFA")
    model = build_model(layout, tiny_model_config(), precision=PrecisionConfig("fp32"))
    via_hook, explicit, plain, logged, values = _hook_vs_explicit(model, layout, ())
    _assert_same_grads(via_hook, explicit, plain)
    return logged["stp_loss"], sum(values) / len(values)


def test_tensor_parallel_ranks_compute_the_same_loss_and_exact_gradients(tmp_path):
    """TP=2 without sequence parallelism: both ranks hold the same hidden states, draw the
    same samples, and the hook's gradients equal the explicit form on each rank."""
    (logged0, explicit0), (logged1, _) = run_distributed(_tp2_hook_run, 2, tmp_path)
    assert logged0 == pytest.approx(explicit0, rel=1e-5)
    assert logged0 == pytest.approx(logged1, rel=1e-6)


def test_before_the_gate_the_loss_is_logged_without_gradient(megatron_single_process):
    from megacpp_mcore.model import build_model

    torch.manual_seed(0)
    layout = parse_pattern("AF")
    model = build_model(layout, tiny_model_config(), precision=PrecisionConfig("fp32"))
    hook = StpHook(StpConfig(enabled=True, start_step=10, triples=8))
    hook.install([model], HookContext(num_microbatches=1, layout=layout))
    hook.before_step(3, [model], None)
    data = _micro_batches(1)
    positions = torch.arange(32).expand(2, 32)
    model(data[0, :, :-1], positions, None, labels=data[0, :, 1:]).mean().backward()
    with_hook = grads(model)
    metrics = hook.metrics()
    assert metrics["stp_weight"] == 0.0 and metrics["stp_loss"] > 0
    hook.remove()
    model.zero_grad(set_to_none=True)
    model(data[0, :, :-1], positions, None, labels=data[0, :, 1:]).mean().backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(with_hook[name], grad, rtol=0, atol=0)
    assert hook.metrics() == {}, "metrics are cleared once read"


def test_hook_refuses_layers_outside_the_decoder(megatron_single_process):
    from megacpp_mcore.model import build_model

    layout = parse_pattern("AF")
    model = build_model(layout, tiny_model_config(), precision=PrecisionConfig("fp32"))
    with pytest.raises(SpecError, match=r"numbered 1..2"):
        StpHook(StpConfig(enabled=True, layers=(3,))).install(
            [model], HookContext(layout=layout))
    with pytest.raises(SpecError, match="no Megatron decoder"):
        StpHook(StpConfig(enabled=True)).install([torch.nn.Linear(2, 2)], HookContext())


# ------------------------------------------------------------------ recipe, flags, translate


def test_recipe_section_is_validated():
    recipe = load_recipe("tiny", ["stp.enabled=true", "stp.start_step=10", "stp.layers=[3]",
                                  "stp.form=span"])
    assert recipe.stp == StpConfig(enabled=True, start_step=10, layers=(3,), form="span")
    with pytest.raises(RecipeError, match=r"stp.layers \[7\]: decoder layers are numbered 1..6"):
        load_recipe("tiny", ["stp.layers=[7]"])
    with pytest.raises(RecipeError, match=r"stp\.weight: must be >= 0"):
        load_recipe("tiny", ["stp.weight=-0.1"])
    with pytest.raises(RecipeError, match=r"stp\.min_gap: must be a positive integer"):
        load_recipe("tiny", ["stp.min_gap=0"])
    assert load_recipe("tiny", ["stp.ramp_steps=0"]).stp.ramp_steps == 0


def test_native_translation_refuses_stp_and_plugin_carries_it():
    from megacpp_mcore.megatron.translate import translate

    recipe = load_recipe("tiny", ["stp.enabled=true", "r_lowering=M", "stp.layers=[2,6]",
                                  "stp.ramp_steps=5"])
    with pytest.raises(TranslateError, match=r"stp\.enabled \(True\) needs the plugin"):
        translate(recipe, "native")
    argv = translate(recipe, "plugin").argv()
    assert "--megacpp-stp" in argv
    i = argv.index("--megacpp-stp-layers")
    assert argv[i + 1:i + 3] == ["2", "6"]
    assert argv[argv.index("--megacpp-stp-ramp-steps") + 1] == "5"
    assert "--megacpp-stp" not in translate(load_recipe("tiny"), "plugin").argv()


def test_plugin_flags_read_back_into_the_same_section():
    import argparse

    from megacpp_mcore.megatron.args import add_megacpp_args, stp_config_from_args
    from megacpp_mcore.megatron.translate import translate

    recipe = load_recipe("tiny", ["stp.enabled=true", "stp.layers=[2,6]", "stp.weight=0.3",
                                  "stp.form=span", "stp.start_step=4"])
    argv = [a for flag in translate(recipe, "plugin").flags
            if flag.name.startswith("--megacpp-stp") for a in flag.argv()]
    args = add_megacpp_args(argparse.ArgumentParser()).parse_args(argv)
    assert stp_config_from_args(args) == recipe.stp
    default = add_megacpp_args(argparse.ArgumentParser()).parse_args([])
    assert stp_config_from_args(default) == StpConfig()


def test_features_build_the_hook_only_when_enabled():
    from megacpp_mcore.features import build_training_hooks

    assert not build_training_hooks(load_recipe("tiny"))
    hooks = build_training_hooks(load_recipe("tiny", ["stp.enabled=true"]))
    (hook,) = list(hooks)
    assert isinstance(hook, StpHook) and hook.eod_id == 256 and hook.seed == 1234


# --------------------------------------------------------------------------- the CLI on the CPU


@pytest.mark.slow
def test_megacpp_train_tiny_logs_stp_after_the_gate(tmp_path, frozen_corpus):
    import os
    import subprocess
    import sys

    from megacpp_mcore.paths import REPO_ROOT
    from megacpp_mcore.receipt import load_receipt

    receipt_path = tmp_path / "r.json"
    # a fresh process: not the rendezvous of this test process (set by earlier tests)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "megacpp_mcore.cli.main", "train", "tiny", "--device", "cpu",
         "--receipt", str(receipt_path), "--set", "training.train_iters=20",
         "--set", "training.log_interval=5", "--set", "training.lr_warmup_iters=2",
         "--set", "training.global_batch_size=4", "--set", "training.micro_batch_size=2",
         "--set", "model.seq_length=64",
         "--set", "stp.enabled=true", "--set", "stp.start_step=10", "--set", "stp.triples=16",
         "--set", "data.source=path", "--set", f"data.paths=[{frozen_corpus}]"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    intervals = load_receipt(receipt_path).intervals
    assert [iv["step"] for iv in intervals] == [5, 10, 15, 20]
    stp = [iv["aux_losses"]["stp_loss"] for iv in intervals]
    assert all(0 < value < 2 for value in stp)
    weights = [iv["aux_losses"]["stp_weight"] for iv in intervals]
    assert weights[0] == 0.0 and weights[2:] == [0.1, 0.1]
    assert "stp_loss" in result.stdout


def test_backward_scale_folds_in_micro_batches_loss_scale_and_context_parallel(
        megatron_single_process):
    from megacpp_mcore.model import build_model

    layout = parse_pattern("AFAF")
    model = build_model(layout, tiny_model_config(), precision=PrecisionConfig("fp32"))
    hook = StpHook(StpConfig(enabled=True, weight=0.2, layers=(2, 4)))
    hook.install([model], HookContext(num_microbatches=4, loss_scale=1.0, layout=layout))
    hook.before_step(1, [model], None)
    assert hook._scale("cpu").item() == pytest.approx(0.2 / (4 * 2))
    model.config.grad_scale_func = lambda ones: ones * 1024.0  # as Megatron sets it
    assert hook._scale("cpu").item() == pytest.approx(1024 * 0.2 / 8)
    hook.cp = (1, 2, None)  # context parallel 2: Megatron averages gradients over CP too
    assert hook._scale("cpu").item() == pytest.approx(2 * 1024 * 0.2 / 8)
    model.config.grad_scale_func = None
    hook.remove()

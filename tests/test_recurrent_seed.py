"""The seed system's R layer (shared q/k heads, q|k|v|f|g, per-channel D, one whole-output
norm, nn.Linear init, bf16 forget gate) built by the plugin on CPU, held to an independent
recomputation from its own parameters; its declared in_proj parts; its FLOP count."""

import math

import pytest
import torch
import torch.nn.functional as F

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.ops.m2rnn.naive import naive_m2rnn_scan
from megacpp_mcore.settings.config import ParallelConfig, PrecisionConfig, RecurrentConfig
from megacpp_mcore.settings.sizes import size_problems
from megacpp_mcore.train.flops import recurrent_flops
from tests.compare import assert_close
from tests.conftest import tiny_model_config

FP32 = PrecisionConfig(params_dtype="fp32")
#: the seed's form at a CPU size: hidden 64, K 16, V 16 -> 64 // 32 = 2 heads
SEED_R = RecurrentConfig(num_heads=None, k_head_dim=16, v_head_dim=16, qk_heads="shared",
                         in_proj_order="qkvfg", skip_scale="per_channel", norm="whole",
                         proj_init="linear_default", forget_bf16=True)


def _seed_mixer(recurrent=SEED_R):
    model = build_model(parse_pattern("AR"), tiny_model_config(recurrent=recurrent),
                        precision=FP32)
    return model, model.decoder.layers[1].mixer


def test_seed_layer_shapes_and_declared_parts(megatron_single_process):
    model, mixer = _seed_mixer()
    reason = model.backend_record["families"]["R"]["reason"]
    assert "shared q/k" in reason and "q|k|v|f|g" in reason and "refused above" in reason
    H, K, V = 2, 16, 16
    assert mixer.num_heads == H  # hidden // (K + V)
    assert mixer.in_proj_parts() == [("q", K), ("k", K), ("v", H * V), ("f", H), ("g", H * V)]
    assert mixer.in_proj.weight.shape == (2 * K + 2 * H * V + H, 64)
    assert mixer.conv1d_weight.shape[0] == 2 * K + H * V
    assert tuple(mixer.D.shape) == (H, V) and tuple(mixer.norm_weight.shape) == (H * V,)
    _, per_head = _seed_mixer(RecurrentConfig(num_heads=4, k_head_dim=16, v_head_dim=16))
    assert per_head.in_proj_parts() == [("q", 64), ("k", 64), ("v", 64), ("g", 64), ("f", 4)]
    assert tuple(per_head.D.shape) == (4,)


def test_seed_layer_is_its_own_recomputation(megatron_single_process):
    """Rebuild the seed layer's output from its parameters with the naive float64 scan: the
    part order, the shared q/k, per-channel D, whole-output norm and bf16 forget all show."""
    torch.manual_seed(0)
    _, mixer = _seed_mixer()
    with torch.no_grad():
        mixer.D.uniform_(0.5, 1.5)
        mixer.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(12, 2, 64)  # [s, b, h]
    out, _ = mixer(x)

    H, K, V = 2, 16, 16
    with torch.no_grad():
        p = (x.double() @ mixer.in_proj.weight.double().T).transpose(0, 1)  # [b, l, n]
        q, k, v, f, g = torch.split(p, [K, K, H * V, H, H * V], dim=-1)
        qkv = torch.cat([q, k, v], dim=-1)
        w = mixer.conv1d_weight.double()
        conv = F.conv1d(F.pad(qkv.transpose(1, 2), (w.shape[-1] - 1, 0)), w,
                        mixer.conv1d_bias.double(), groups=qkv.shape[-1])
        q, k, v = torch.split(F.silu(conv.transpose(1, 2)), [K, K, H * V], dim=-1)
        b, L = q.shape[:2]
        forget = torch.exp(-torch.exp(mixer.A_log.double())
                           * F.softplus(f + mixer.dt_bias.double()))
        forget = forget.to(torch.bfloat16).double()
        y, _ = naive_m2rnn_scan(q.reshape(b, L, 1, K), k.reshape(b, L, 1, K),
                                v.reshape(b, L, H, V), forget, mixer.state_weight.double(),
                                torch.zeros(b, H, K, V, dtype=torch.float64))
        y = (y + mixer.D.double() * v.reshape(b, L, H, V)) * F.silu(g.reshape(b, L, H, V))
        y = y.reshape(b, L, H * V)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * mixer.norm_weight.double()
        want = y.transpose(0, 1) @ mixer.out_proj.weight.double().T
    assert_close(out.double(), want, rtol=2e-4, atol=2e-5, what="seed R layer output")


def test_linear_default_init(megatron_single_process):
    torch.manual_seed(1)
    _, seed = _seed_mixer()
    _, normal = _seed_mixer(RecurrentConfig(num_heads=2, k_head_dim=16, v_head_dim=16))
    bound_in = 1 / math.sqrt(64)
    w = seed.in_proj.weight.detach()
    assert w.abs().max() <= bound_in and w.std().item() == pytest.approx(bound_in / math.sqrt(3),
                                                                  rel=0.1)
    bound_out = 1 / math.sqrt(seed.out_proj.weight.shape[1])
    assert seed.out_proj.weight.abs().max() <= bound_out
    # Megatron's normal init (init_std 0.02) for the per-head layer
    assert normal.in_proj.weight.detach().std().item() == pytest.approx(0.02, rel=0.1)


def test_seed_form_refused_over_tensor_parallel():
    model = tiny_model_config(recurrent=SEED_R)
    problems = size_problems(parse_pattern("AR"), model, ParallelConfig(tensor=2))
    assert any("seed's R form" in p and "refused" in p for p in problems)


def test_flops_follow_the_layer_built(megatron_single_process):
    for recurrent in (SEED_R, RecurrentConfig(num_heads=4, k_head_dim=16, v_head_dim=16)):
        _, mixer = _seed_mixer(recurrent)
        H, K, V = mixer.num_heads, 16, 16
        weights = (mixer.in_proj.weight.numel() + mixer.out_proj.weight.numel()
                   + mixer.conv1d_weight.numel())
        recurrence = H * (2 * K * V * V + 6 * K * V)
        model = tiny_model_config(recurrent=recurrent)
        assert recurrent_flops(model) == 2.0 * weights + recurrence


def test_seed_layer_trains(megatron_single_process):
    torch.manual_seed(2)
    model, _ = _seed_mixer()
    tokens = torch.randint(0, 256, (2, 33))
    positions = torch.arange(32).expand(2, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())

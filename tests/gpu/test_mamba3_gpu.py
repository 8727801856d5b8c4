"""Mamba-3 (SISO) on the GPU: mamba-ssm's Triton scan against the project's PyTorch reference,
outputs and every gradient, at the op and at the layer (``pytest -m gpu tests/gpu``).

The kernels compile on first use (Triton autotuning: minutes on a fresh machine)."""

import pytest
import torch

from megacpp_mcore.backend import resolve_backend
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.ops.mamba3.reference import mamba3_siso_reference
from megacpp_mcore.settings.config import MambaConfig
from tests.compare import outputs_and_grads, rel_err
from tests.gpu.test_model_gpu import BF16, FP32, _layer_outputs_and_grads, _reseed
from tests.gpu.test_model_gpu import gpu_model_config as base_config

pytestmark = pytest.mark.gpu
NAMES = ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles", "D", "Z")


def _inputs(batch=2, length=200, heads=8, qk_heads=2, n=64, p=64, angles=16, seed=0):
    """Inputs as the layer makes them, rounded to what the kernel reads (bf16 activations,
    fp32 step sizes, biases and D)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    dt = torch.nn.functional.softplus(rand(batch, heads, length, dtype=torch.float32) - 3)
    A = -torch.rand(heads, device="cuda", generator=gen) * 2 - 0.1
    return dict(
        Q=rand(batch, length, qk_heads, n, scale=0.3), K=rand(batch, length, qk_heads, n,
                                                             scale=0.3),
        V=rand(batch, length, heads, p), ADT=dt * A[None, :, None], DT=dt,
        Trap=rand(batch, heads, length), Q_bias=1 + rand(heads, n, dtype=torch.float32,
                                                         scale=0.1),
        K_bias=1 + rand(heads, n, dtype=torch.float32, scale=0.1),
        Angles=rand(batch, length, heads, angles), D=rand(heads, dtype=torch.float32),
        Z=rand(batch, length, heads, p),
    )


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_fused_siso_matches_reference(megatron_gpu, chunk_size):
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

    inputs = _inputs()
    weights = torch.randn(2, 200, 8, 64, device="cuda",
                          generator=torch.Generator("cuda").manual_seed(1))
    fused = outputs_and_grads(lambda **kw: mamba3_siso_combined(**kw, chunk_size=chunk_size),
                              inputs, cotangents=[weights])
    reference = outputs_and_grads(
        lambda **kw: mamba3_siso_reference(**kw, chunk_size=chunk_size), inputs,
        cotangents=[weights])
    assert tuple(inputs) == NAMES
    errors = {name: rel_err(a, b)
              for name, a, b in zip(("output", *NAMES), fused, reference, strict=True)}
    print("mamba3 siso chunk", chunk_size, {k: f"{v:.2e}" for k, v in errors.items()})
    # bf16 operands inside the kernel (and its fast tanh/sin/cos/sigmoid approximations)
    assert max(errors.values()) < 3e-2, errors


def _mamba3_config(seq_length=512):
    mamba = MambaConfig(variant="mamba3", state_dim=64, head_dim=64, num_groups=2,
                        chunk_size=64)
    return base_config(seq_length=seq_length, mamba=mamba)


@pytest.mark.parametrize(("precision", "tolerance"), [(BF16, 3e-2), (FP32, 3e-2)],
                         ids=["bf16", "fp32"])
def test_fused_mamba3_layer_matches_reference(megatron_gpu, precision, tolerance):
    layout, config = parse_pattern("M"), _mamba3_config()
    plan = resolve_backend("local", layout, mamba_variant="mamba3")
    results, weights = {}, None
    for path in ("reference", "fused"):
        _reseed()
        model = build_model(layout, config, precision=precision,
                            plan=plan.with_path("M", path, "parity test"))
        assert model.decoder.layers[0].mixer.path == path
        if weights is None:
            weights = model.state_dict()
        else:
            model.load_state_dict(weights, strict=True)
        dtype = torch.bfloat16 if precision is BF16 else torch.float32
        gen = torch.Generator("cuda").manual_seed(0)
        hidden = torch.randn(512, 2, config.hidden_size, device="cuda", generator=gen)
        results[path] = _layer_outputs_and_grads(model, hidden.to(dtype).requires_grad_())
    (out_f, grads_f, dx_f), (out_r, grads_r, dx_r) = results["fused"], results["reference"]
    errors = {"output": rel_err(out_f, out_r), "input grad": rel_err(dx_f, dx_r)}
    errors.update({name: rel_err(grads_f[name], grads_r[name]) for name in grads_r})
    print("mamba3 layer", precision.params_dtype, {k: f"{v:.2e}" for k, v in errors.items()})
    assert set(grads_f) == set(grads_r)
    assert max(errors.values()) < tolerance, errors


def test_mamba3_model_trains_in_bf16(megatron_gpu):
    _reseed()
    model = build_model(parse_pattern("AEMFRA"), _mamba3_config(seq_length=256),
                        backend="te", precision=BF16)
    record = model.backend_record["families"]["M"]
    assert record["path"] == "fused" and "Mamba-3" in record["reason"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 257), generator=gen).cuda()
    positions = torch.arange(256, device="cuda").expand(2, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("mamba3 losses", [round(x, 3) for x in losses])
    assert losses[-1] < losses[0] - 1.0

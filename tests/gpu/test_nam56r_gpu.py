"""NAM56R as the seed trains it, on one GPU: the shared-q/k fused R scan against the
reference, the seed's R layer fused vs reference, MLA and DSA attention per position built
and trained by the plugin (te), and the quarter recipe's model built and stepped.

Run on the GPU machine: ``python -m pytest -m gpu tests/gpu/test_nam56r_gpu.py -v -s``.
"""

import pytest
import torch

from megacpp_mcore.backend import have_module, resolve_backend
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.ops.m2rnn.dispatch import m2rnn_scan
from megacpp_mcore.settings.config import (
    AttentionConfig,
    DSAConfig,
    MLAConfig,
    PrecisionConfig,
    RecurrentConfig,
)
from megacpp_mcore.settings.recipe import load_recipe
from tests.compare import rel_err
from tests.gpu.test_model_gpu import BF16, FP32, _batch, _layer_outputs_and_grads, _reseed
from tests.gpu.test_model_gpu import gpu_model_config as base_config

pytestmark = pytest.mark.gpu
SEED_R = RecurrentConfig(num_heads=None, k_head_dim=64, v_head_dim=16, qk_heads="shared",
                         in_proj_order="qkvfg", skip_scale="per_channel", norm="whole",
                         proj_init="linear_default", forget_bf16=True)
ATTENTION = AttentionConfig(
    variant="dsa", mla_ranks=(0,), mtp_variant="mla",
    mla=MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_head_dim=64, qk_pos_emb_head_dim=64,
                  v_head_dim=64, rope_type="yarn"),
    dsa=DSAConfig(indexer_heads=4, indexer_head_dim=64, top_k=64, indexer_loss_coeff=0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_qk_fused_scan_matches_reference(megatron_gpu, dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    B, T, H, K, V = 2, 1024, 51, 64, 16
    q, k = (torch.randn(B, T, 1, K, device="cuda", generator=gen).mul(0.5).to(dtype)
            for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen).mul(0.5).to(dtype)
    f = torch.sigmoid(torch.randn(B, T, H, device="cuda", generator=gen) * 2).to(dtype)
    W = (torch.eye(V, device="cuda") + 0.02 * torch.randn(H, V, V, device="cuda",
                                                            generator=gen))
    results = {}
    for path in ("fused", "reference"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, f, W)]
        y, h = m2rnn_scan(*xs, path=path, backward_chunk=64)
        gy = torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        torch.autograd.backward((y.float(),), (gy,))
        results[path] = [y.detach(), h.detach(), *(x.grad for x in xs)]
    tol = 1e-2 if dtype is torch.bfloat16 else 1e-4
    for name, a, b in zip(["y", "h", "dq", "dk", "dv", "df", "dW"], *results.values(),
                          strict=True):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    assert results["fused"][2].shape == (B, T, 1, K)  # no per-head copies of q


@pytest.mark.parametrize(("precision", "tolerance"), [(BF16, 2e-2), (FP32, 1e-4)])
def test_seed_r_layer_fused_matches_reference(megatron_gpu, precision, tolerance):
    layout = parse_pattern("R")
    config = base_config(hidden_size=320, seq_length=512, recurrent=SEED_R)  # 4 heads
    plan = resolve_backend("local", layout)
    results = {}
    for path in ("fused", "reference"):
        _reseed()
        model = build_model(layout, config, plan=plan.with_path("R", path, "parity test"),
                            precision=precision)
        dtype = torch.bfloat16 if precision is BF16 else torch.float32
        hidden = torch.randn(512, 2, 320, device="cuda",
                             generator=torch.Generator("cuda").manual_seed(0))
        results[path] = _layer_outputs_and_grads(model, hidden.to(dtype).requires_grad_())
    (out_f, grads_f, dx_f), (out_r, grads_r, dx_r) = results["fused"], results["reference"]
    errors = {"output": rel_err(out_f, out_r), "input grad": rel_err(dx_f, dx_r)}
    errors.update({name: rel_err(grads_f[name], grads_r[name]) for name in grads_r})
    print("seed R", precision.params_dtype, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < tolerance, errors


def test_mla_and_dsa_per_position_train(megatron_gpu):
    """'+' at A rank 0, 'D' at the others, MLA in the MTP part; te backend, bf16."""
    _reseed()
    layout = parse_pattern("AEMAEMAF/AF")
    model = build_model(layout, base_config(num_query_groups=None, attention=ATTENTION),
                        backend="te", precision=BF16)
    record = model.backend_record
    assert record["families"]["A"]["path"] == "mla+dsa"
    assert record["dsa_rotate"] == have_module("fast_hadamard_transform"), record
    kinds = [type(layer.self_attention).__name__ for layer in model.decoder.layers
             if hasattr(layer, "self_attention") and layer.self_attention.__class__.__name__
             != "IdentityOp"]
    assert kinds == ["MLASelfAttention", "AbsorbedMLASelfAttention",
                     "AbsorbedMLASelfAttention"], kinds
    tokens, positions, labels = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("mla+dsa losses", [round(x, 3) for x in losses], record["families"]["A"]["reason"])
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


def test_nam56r_quarter_builds_and_steps(megatron_gpu):
    """The quarter recipe's model (MLA/DSA, MoE, M, the seed's R, MTP 2) on one GPU."""
    _reseed()
    # Megatron sizes its process-global MTP loss tracker by the first MTP model it sees
    # (an earlier test built one MTP depth; this model has two): start it afresh.
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()
    recipe = load_recipe("nam56r_quarter", ["model.seq_length=1024"])
    model = build_model(recipe.layout, recipe.model, backend=recipe.backend,
                        precision=PrecisionConfig(params_dtype="bf16"))
    tokens, positions, labels = _batch(seq=1024, vocab=recipe.model.vocab_size, batch=1)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    print("quarter", model.backend_record, "peak GiB",
          torch.cuda.max_memory_allocated() / 2**30)
    assert torch.isfinite(loss)

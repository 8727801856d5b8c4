"""``model.moe.expert_gemm: torch`` on one GPU: the same parameters as TE's experts, the same
maths (losses and gradients of the same weights within bf16 rounding), and a checkpoint of
one loads into the other. Run on the GPU machine: ``pytest -m gpu tests/gpu``."""

from dataclasses import replace

import pytest
import torch

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import PrecisionConfig
from tests.compare import rel_err
from tests.gpu.test_model_gpu import _batch, _reseed, gpu_model_config

pytestmark = pytest.mark.gpu
BF16 = PrecisionConfig(params_dtype="bf16")


def _models(pattern="AEME"):
    config = gpu_model_config()
    built = {}
    for kernel in ("te", "torch"):
        _reseed()
        model_config = replace(config, moe=replace(config.moe, expert_gemm=kernel))
        built[kernel] = build_model(parse_pattern(pattern), model_config, backend="te",
                                    precision=BF16).cuda()
    return built


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    tokens, positions, labels = batch
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def test_torch_experts_match_te_experts(megatron_gpu):
    built = _models()
    te, torch_experts = built["te"], built["torch"]
    fc1 = torch_experts.decoder.layers[1].mlp.experts.linear_fc1
    assert type(fc1).__name__ == "TorchColumnGroupedLinear"
    assert "torch grouped GEMM" in torch_experts.backend_record["families"]["E"]["reason"]
    assert type(te.decoder.layers[1].mlp.experts.linear_fc1).__name__ != type(fc1).__name__
    # the same parameter names and shapes: TE's weights load as they are
    te_state = te.state_dict()
    assert {k: v.shape for k, v in te_state.items() if "_extra_state" not in k} == {
        k: v.shape for k, v in torch_experts.state_dict().items() if "_extra_state" not in k}
    torch_experts.load_state_dict(te_state, strict=False)
    batch = _batch()
    loss_te, grads_te = _loss_and_grads(te, batch)
    loss_torch, grads_torch = _loss_and_grads(torch_experts, batch)
    assert abs(loss_te - loss_torch) < 1e-2, (loss_te, loss_torch)
    assert grads_te.keys() == grads_torch.keys()
    experts = [n for n in grads_te if ".experts." in n]
    assert len(experts) == 2 * 2 * 4  # 2 E layers x fc1/fc2 x 4 experts
    for name in experts:
        assert rel_err(grads_torch[name], grads_te[name]) < 2e-2, name


def test_torch_experts_train_and_refuse_what_they_cannot_run(megatron_gpu):
    model = _models("EE")["torch"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, losses = _batch(), []
    for _ in range(8):
        loss, _ = _loss_and_grads(model, batch)
        optimizer.step()
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.1, losses
    config = gpu_model_config()
    fp32 = replace(config, moe=replace(config.moe, expert_gemm="torch"))
    with pytest.raises(SpecError, match=r"expert_gemm torch: parameters are torch\.float32"):
        build_model(parse_pattern("E"), fp32, backend="te",
                    precision=PrecisionConfig(params_dtype="fp32"))

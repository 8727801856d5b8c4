"""The torch grouped-GEMM expert kernel (``model.moe.expert_gemm``): the maths against one
matmul per expert, the refusals, the backend record and the settings row. The module built
into TE's experts needs a GPU: tests/gpu/test_grouped_experts_gpu.py."""

from types import SimpleNamespace

import pytest
import torch

from megacpp_mcore.backend import experts_kernel, resolve_backend
from megacpp_mcore.layers.grouped_experts import (
    grouped_gemm_problem,
    grouped_linear,
    grouped_linear_reference,
)
from megacpp_mcore.layout import parse_pattern


@pytest.mark.parametrize("splits", [[3, 0, 9, 4], [0, 0, 16, 0], [0, 0, 0, 0]])
def test_grouped_linear_equals_one_matmul_per_expert(splits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(splits), 16, generator=gen)
    weights = [torch.randn(24, 16, generator=gen) for _ in splits]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1 = [w.clone().requires_grad_() for w in weights]
    w2 = [w.clone().requires_grad_() for w in weights]
    out, ref = grouped_linear(x1, w1, splits), grouped_linear_reference(x2, w2, splits)
    assert out.shape == (sum(splits), 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(w1, w2, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_grouped_linear_refuses_splits_that_do_not_add_up():
    with pytest.raises(ValueError, match="10 rows, but the groups add up to 9"):
        grouped_linear(torch.zeros(10, 8), [torch.zeros(8, 8)] * 2, [4, 5])
    with pytest.raises(ValueError, match="3 groups of rows for 2 weights"):
        grouped_linear(torch.zeros(9, 8), [torch.zeros(8, 8)] * 2, [4, 5, 0])


def _config(**kw):
    base = dict(fp8=None, fp4=None, params_dtype=torch.bfloat16,
                moe_single_grouped_weight=False, use_transformer_engine_op_fuser=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("change, message", [
    (dict(fp8="hybrid"), "FP8/FP4"),
    (dict(params_dtype=torch.float32), "parameters are torch.float32"),
    (dict(use_transformer_engine_op_fuser=True), "op_fuser"),
    (dict(moe_single_grouped_weight=True), "single grouped"),
])
def test_grouped_gemm_problem_names_what_it_cannot_run(change, message):
    assert message in grouped_gemm_problem(_config(**change), 64, 128, False, False)


def test_grouped_gemm_problem_checks_bias_delay_and_alignment():
    assert "biases" in grouped_gemm_problem(_config(), 64, 128, True, False)
    assert "delay" in grouped_gemm_problem(_config(), 64, 128, False, True)
    assert "multiples of 8" in grouped_gemm_problem(_config(), 60, 128, False, False)
    if not torch.cuda.is_available():  # the last rule: a Hopper GPU
        assert "SM90" in grouped_gemm_problem(_config(), 64, 128, False, False)


def test_experts_kernel_and_the_backend_record():
    assert experts_kernel("te", True, "torch") == "torch"
    assert experts_kernel("te", True, "te") == "te"
    assert experts_kernel("te", False, "torch") == "sequential"
    assert experts_kernel("local", True, "torch") == "sequential"
    plan = resolve_backend("local", parse_pattern("AE"), cuda=False, expert_gemm="torch")
    reason = plan.families["E"].reason
    assert "experts: SequentialMLP" in reason
    assert "expert_gemm torch applies to backend te with grouped_gemm" in reason


def test_expert_gemm_setting_travels_to_the_plugin_and_native_refuses_it():
    from megacpp_mcore.megatron.translate import translate
    from megacpp_mcore.settings.recipe import load_recipe

    recipe = load_recipe("tiny", overrides=["model.moe.expert_gemm=torch"])
    assert recipe.model.moe.expert_gemm == "torch"
    flags = translate(recipe, target="plugin").argv()
    assert flags[flags.index("--megacpp-moe-expert-gemm") + 1] == "torch"

    # the native target builds the same model with TE's kernel, and says so
    plan = translate(load_recipe("tiny", overrides=["r_lowering=M", "data.source=mock",
                                                    "model.moe.expert_gemm=torch"]))
    assert "--megacpp-moe-expert-gemm" not in plan.argv()
    omitted = {o["field"]: o["reason"] for o in plan.to_json()["omitted"]}
    assert "TE's GroupedLinear" in omitted["model.moe.expert_gemm"]


def test_torch_experts_swap_only_fc1_and_fc2_in_megatrons_moe_spec(monkeypatch):
    """The spec keeps Megatron's MoE builder, its experts' module and every other keyword;
    only the experts' fc1/fc2 classes change (shown on the local spec: TE's needs a GPU)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megacpp_mcore.specs import moe as moe_spec

    class Column:
        pass

    class Row:
        pass

    monkeypatch.setattr(moe_spec, "torch_grouped_linears", lambda: (Column, Row))
    stock = get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False)
    swapped = moe_spec._with_torch_grouped_experts(stock)
    old, new = stock.keywords["submodules"], swapped.keywords["submodules"]
    assert swapped.func is stock.func and swapped.args == stock.args
    assert new.experts.func is old.experts.func
    experts = new.experts.keywords["submodules"]
    assert (experts.linear_fc1, experts.linear_fc2) == (Column, Row)
    assert experts.activation_func == old.experts.keywords["submodules"].activation_func
    assert {k: v for k, v in vars(new).items() if k != "experts"} == \
        {k: v for k, v in vars(old).items() if k != "experts"}

"""megacpp bench on one GPU at a small size: native Megatron (TE hybrid_stack_spec) and the
plugin hold the same weights and give the same per-token losses in bf16, and a short session
runs every run and family without errors. Run on the GPU machine:
``pytest -m gpu tests/gpu/test_bench_gpu.py`` (about a minute; nothing here asserts speed)."""

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import MambaConfig, ModelConfig, MoEConfig, PrecisionConfig
from megacpp_mcore.train.bench import (
    BenchSettings,
    build_native,
    map_weights,
    render,
    run_bench,
    same_weights_same_loss,
)

pytestmark = pytest.mark.gpu
BF16 = PrecisionConfig(params_dtype="bf16")


def small_config() -> ModelConfig:
    return ModelConfig(
        hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
        kv_channels=64, vocab_size=512, seq_length=256, position_embedding="none",
        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=256, aux_loss_coeff=1e-3),
        mamba=MambaConfig(state_dim=64, head_dim=64, num_groups=2),
    )


def test_native_and_plugin_hold_the_same_weights_and_losses(megatron_gpu):
    layout = parse_pattern("AEMF")
    torch.manual_seed(1)
    native = build_native(layout, small_config(), BF16).cuda()
    plugin = build_model(layout, small_config(), backend="te", precision=BF16).cuda()
    weights = map_weights(native, plugin)
    assert weights.complete, weights.to_json()
    gen = torch.Generator(device="cuda").manual_seed(3)
    tokens = torch.randint(0, 512, (2, 257), device="cuda", generator=gen)
    check, _ = same_weights_same_loss("plugin", native, plugin, tokens[:, :-1], tokens[:, 1:],
                                      loss_tol=0.02, token_loss_tol=0.1)
    assert check.passed, check.describe()
    assert check.before_copy_token_mean_abs_diff > 5 * check.token_mean_abs_diff, check.describe()


def test_a_short_session_runs_every_run_and_family(megatron_gpu):
    settings = BenchSettings(rounds=2, warmup=1, steps=2, families="AEMFR", family_depth=2,
                             family_rounds=2, profile_steps=1)
    report = run_bench(parse_pattern("AEMEAEMM"), small_config(), BF16, 2, settings,
                       log=print)
    print(render(report))
    assert report["errors"] == []
    assert all(c["passed"] for c in report["loss_checks"]), report["loss_checks"]
    assert [r["name"] for r in report["runs"]] == ["native", "plugin", "native_tuned",
                                                   "plugin_tuned"]
    assert all(r["busy_ms"] and r["busy_ms"] > 0 for r in report["runs"])
    assert all(r["peak_gib"] > 0 for r in report["runs"])
    assert set(report["families"]) == set("AEMFR")


def test_a_pattern_with_r_reports_its_share(megatron_gpu):
    settings = BenchSettings(rounds=2, warmup=1, steps=2, families="", profile_steps=0)
    report = run_bench(parse_pattern("AEMR"), small_config(), BF16, 2, settings, log=print)
    assert report["errors"] == []
    assert {"R share of step", "R layers / M layers (time)"} <= set(report["ratios"])

"""megacpp bench without a GPU: statistics and tables, the weight mapping and the same-loss
check (real Megatron models on CPU), the run plan, and the command's input errors.

Nothing here times anything: timing is GPU-only (tests/gpu/test_bench_gpu.py).
"""

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megacpp_mcore.backend import resolve_backend
from megacpp_mcore.cli.main import main
from megacpp_mcore.cpu_support import adapt_model_for_cpu
from megacpp_mcore.errors import BenchError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import MoEConfig, PrecisionConfig
from megacpp_mcore.specs.stack import build_stack_spec
from megacpp_mcore.train.bench import (
    Bench,
    BenchSettings,
    build_native,
    config_diff,
    map_weights,
    native_name,
    r_costs,
    ratios,
    same_weights_same_loss,
)
from megacpp_mcore.train.bench_report import (
    RoundTiming,
    RunResult,
    Spread,
    format_families,
    format_ratio,
    format_table,
    ratio_spread,
    union_length,
    verdict,
)
from tests.conftest import tiny_model_config

FP32 = PrecisionConfig(params_dtype="fp32")
CPU_MOE = MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=64, grouped_gemm=False,
                    token_dispatcher="allgather")  # alltoall needs CUDA streams


def cpu_config(**overrides):
    return tiny_model_config(position_embedding="rope", moe=CPU_MOE, **overrides)


# --------------------------------------------------------------------------- statistics


def _run(name, step_ms_per_round, tokens=1000, flops=1e9):
    result = RunResult(name, tokens, flops)
    for ms in step_ms_per_round:
        result.rounds.append(RoundTiming([ms, ms + 10, ms - 1], [ms / 2] * 3, [ms - 2] * 3))
    return result


def test_summary_takes_medians_of_round_medians_and_derives_rates():
    run = _run("native", [100.0, 50.0, 200.0])  # round medians 100, 50, 200 -> 100 ms
    run.peak_bytes = 3 * 2**30
    row = run.summary(peak_tflops=10.0)
    assert row["step_ms"] == 100.0
    assert row["tokens_per_s"] == pytest.approx(10_000.0)
    assert row["tflops"] == pytest.approx(1e9 * 10_000 / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops"] / 10.0)
    assert row["host_ms"] == 50.0 and row["span_ms"] == 98.0
    assert row["peak_gib"] == pytest.approx(3.0)
    assert row["round_tokens_per_s"] == pytest.approx([10_000.0, 20_000.0, 5_000.0])
    assert run.summary(peak_tflops=None)["mfu"] is None


def test_ratios_are_per_round_with_median_and_spread():
    spread = ratio_spread([110.0, 90.0, 130.0, 100.0, 120.0], [100.0] * 5)
    assert spread.ratios == pytest.approx((1.1, 0.9, 1.3, 1.0, 1.2))
    assert (spread.median, spread.low, spread.high) == pytest.approx((1.1, 0.9, 1.3))
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        ratio_spread([1.0, 2.0], [1.0])


def test_a_target_is_met_only_outside_the_spread():
    assert verdict(Spread((1.05, 1.2, 1.1)), 1.0) == "met"
    assert verdict(Spread((0.95, 1.2, 1.1)), 1.0) == "inside the spread"
    assert verdict(Spread((0.8, 0.9)), 1.0) == "not met"
    # "at most" targets (R costs at most 1.2 x an M layer)
    assert verdict(Spread((1.1, 1.15)), 1.2, at_most=True) == "met"
    assert verdict(Spread((1.1, 1.3)), 1.2, at_most=True) == "inside the spread"
    assert verdict(Spread((1.3, 1.5)), 1.2, at_most=True) == "not met"
    line = format_ratio("plugin / native", Spread((0.95, 1.2, 1.1)), 1.0)
    assert "median 1.100" in line and "[0.950, 1.200]" in line
    assert "target >= 1.00: inside the spread" in line


def test_union_length_counts_overlapping_kernels_once():
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_length([(3, 4), (0, 1)]) == 2


def test_tables_show_every_run_and_failures():
    rows = [_run("native", [100.0]).summary(989.0), _run("plugin", [80.0]).summary(989.0),
            {"name": "plugin_tuned", "error": "OutOfMemoryError: boom"}]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "step", "ms"]
    assert lines[2].split()[:3] == ["native", "100.0", "10000"]
    assert lines[3].split()[:3] == ["plugin", "80.0", "12500"]
    assert "plugin_tuned" in lines[4] and "FAILED: OutOfMemoryError: boom" in lines[4]
    fam = format_families({"A": [_run("A native", [10.0, 10.0]).summary(None),
                                 _run("A plugin", [8.0, 12.5]).summary(None)]}, 8)
    row = fam.splitlines()[1].split()
    assert row[:3] == ["A", "10.0", "10.2"]
    assert "1.025 [0.800, 1.250]" in fam  # tok/s ratios 1.25 and 0.8 -> median 1.025


def test_main_ratios_and_r_costs_from_rounds():
    results = [_run("native", [100.0, 100.0]), _run("plugin", [80.0, 125.0])]
    spreads = ratios(results)
    assert spreads["plugin / native"].ratios == pytest.approx((1.25, 0.8))
    assert set(spreads) == {"plugin / native"}
    r_mode = [_run("plugin", [100.0, 110.0]), _run("plugin_noR", [90.0, 100.0]),
              _run("plugin_RtoM", [95.0, 104.0])]
    costs = r_costs(r_mode)
    assert costs["R share of step"].ratios == pytest.approx((0.1, 10 / 110))
    assert costs["R layers / M layers (time)"].ratios == pytest.approx((2.0, 2.5))


# --------------------------------------------------------------------------- same weights


def _native_and_plugin(pattern, native_overrides=None, plugin_config=None, seed_offset=0):
    """A 'native' HybridModel (native_config over Megatron's HybridModel; the stack spec is
    the plugin's local one because Megatron's own hybrid stack needs Transformer Engine)
    and a plugin model with different initial weights."""
    layout = parse_pattern(pattern)
    model_config = cpu_config()
    plan = resolve_backend("local", layout, moe_dispatcher="allgather")
    torch.manual_seed(1)
    native = build_native(layout, model_config, FP32,
                          overrides={"use_cpu_initialization": True, **(native_overrides or {})},
                          stack_spec=build_stack_spec(layout, model_config, plan))
    adapt_model_for_cpu(native)
    torch.manual_seed(2 + seed_offset)
    plugin_layout = parse_pattern(plugin_config[0]) if plugin_config else layout
    plugin_model = plugin_config[1] if plugin_config else model_config
    plugin = build_model(plugin_layout, plugin_model, backend="local", precision=FP32)
    return native, plugin, model_config


def _batch(vocab=256, seq=32, batch=2):
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(5))
    return tokens[:, :-1], tokens[:, 1:]


def test_native_weights_copied_into_the_plugin_give_the_same_losses(megatron_single_process):
    native, plugin, _ = _native_and_plugin("AEMF")
    weights = map_weights(native, plugin)
    assert weights.complete, weights.to_json()
    assert len(weights.pairs) == len(list(plugin.parameters()))
    check, _ = same_weights_same_loss("plugin", native, plugin, *_batch(), loss_tol=0.02,
                                      token_loss_tol=0.1)
    assert check.passed, check.describe()
    assert check.token_max_abs_diff < 1e-5
    # the check tells different weights apart: before the copy, per-token losses differed
    assert check.before_copy_token_mean_abs_diff > 0.1, check.describe()
    for (_, a), (_, b) in zip(sorted(native.named_parameters()),
                              sorted(plugin.named_parameters()), strict=True):
        assert torch.equal(a, b)


def test_a_model_computing_something_else_fails_the_check(megatron_single_process):
    # Same parameters, a different function (RoPE base): the weights map fully, the losses
    # do not agree.
    other = cpu_config(rotary_base=7)
    native, plugin, _ = _native_and_plugin("AA", plugin_config=("AA", other))
    assert map_weights(native, plugin).complete
    check, _ = same_weights_same_loss("plugin", native, plugin, *_batch(), loss_tol=1e-4,
                                      token_loss_tol=1e-4)
    assert not check.passed and not check.skipped
    assert "DIFFER" in check.describe()


def test_unmapped_parameters_make_the_check_skipped_and_named(megatron_single_process):
    native, plugin, _ = _native_and_plugin("AEFA", plugin_config=("AEMA", cpu_config()))
    weights = map_weights(native, plugin)
    assert not weights.complete
    assert any("decoder.layers.2.mixer.in_proj.weight" in p for p in weights.plugin_only)
    assert "decoder.layers.2.mlp.linear_fc1.weight" in weights.native_only
    check, _ = same_weights_same_loss("plugin", native, plugin, *_batch(), loss_tol=0.02,
                                      token_loss_tol=0.1)
    assert check.skipped and "decoder.layers.2.mixer" in check.skipped
    assert not check.passed
    assert "skipped" in check.describe()


def test_the_mamba_norm_weight_maps_to_megatrons_name():
    assert native_name("decoder.layers.3.mixer.norm_weight") == "decoder.layers.3.mixer.norm.weight"
    assert native_name("decoder.layers.3.mixer.in_proj.weight") == (
        "decoder.layers.3.mixer.in_proj.weight")


def test_config_diff_names_exactly_the_differing_stock_fields():
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
    a = TransformerConfig(**base, bias_dropout_fusion=True, moe_router_topk=3)
    b = TransformerConfig(**base)
    diff = config_diff(a, b)
    assert diff == {"bias_dropout_fusion": {"value": True, "reference": False},
                    "moe_router_topk": {"value": 3, "reference": 2}}


# --------------------------------------------------------------------------- the run plan


def test_main_runs_share_shapes_and_tuned_runs_take_the_diff(megatron_single_process):
    layout = parse_pattern("AEMF")
    settings = BenchSettings(backend="local", tuned_micro_batch=4,
                             tuned_config={"moe_permute_fusion": True})
    bench = Bench(layout, tiny_model_config(), FP32, 2, settings, log=lambda _: None)
    specs = {s.name: s for s in bench.main_specs()}
    assert list(specs) == ["native", "plugin", "native_tuned", "plugin_tuned"]
    assert specs["native"].native and not specs["plugin"].native
    assert specs["native"].overrides == {} and specs["plugin"].overrides == {}
    tuned = specs["plugin_tuned"].overrides
    assert tuned == {"moe_router_fusion": True, "moe_permute_fusion": True}
    diff = bench.report["config_diff"]
    assert "is_hybrid_model" in diff  # a stock field the plugin sets and native leaves
    assert specs["native_tuned"].overrides == {**{k: v["value"] for k, v in diff.items()},
                                               **tuned}
    assert specs["native_tuned"].micro_batch == 4 and specs["native"].micro_batch == 2


def test_a_pattern_with_r_is_timed_plugin_only_against_no_r_and_r_as_m():
    layout = parse_pattern("AEMEAEMEAEMR", 24)
    bench = Bench(layout, tiny_model_config(), FP32, 2, BenchSettings(), log=lambda _: None)
    specs = {s.name: s for s in bench.main_specs()}
    assert list(specs) == ["plugin", "plugin_noR", "plugin_RtoM"]
    assert not any(s.native for s in specs.values())
    assert specs["plugin_noR"].layout.canonical == layout.canonical.replace("R", "")
    assert specs["plugin_RtoM"].layout.canonical == layout.canonical.replace("R", "M")
    with pytest.raises(BenchError, match="no R"):
        build_native(layout, tiny_model_config(), FP32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rounds=0), "rounds must be at least 1"),
    (dict(runs=("native", "fast")), "accepted are native, plugin"),
    (dict(families="AX"), "letters \\['X'\\]"),
    (dict(tuned_micro_batch=0), "tuned_micro_batch"),
    (dict(loss_tol=0), "tolerances must be positive"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(BenchError, match=message):
        BenchSettings(**kwargs)


@pytest.mark.parametrize("argv, message", [
    (["bench", "--runs", "native,turbo"], "accepted are native"),
    (["bench", "--tuned-config", "not_a_field=1"], "not Megatron TransformerConfig fields"),
    (["bench", "--tuned-config", "novalue"], "expected FIELD=VALUE"),
    (["bench", "--set", "parallel.expert=2", "--set", "model.moe.num_experts=8"],
     "one process on one GPU"),
    (["bench", "--pattern", "AEM/AE", "--set", "mtp_depths=1"], "'|' or '/'"),
    (["bench", "--tuned-set", "training.lr=0.5"], "only model.* settings"),
    (["bench", "--tuned-set", "model.moe.expert_gemm=cublas"], "model.moe.expert_gemm"),
])
def test_bench_command_refuses_bad_input_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_command_without_a_gpu_says_so(capsys):
    assert main(["bench", "--quick", "--families", ""]) == 2
    err = capsys.readouterr().err
    assert "times training steps on a CUDA GPU" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the whole session


def test_a_whole_session_runs_on_cpu_and_reports_everything(megatron_single_process):
    """The session end to end on CPU (local modules; timings are not looked at): every run
    is built, gets native's weights, passes the same-loss check, is run every round; the
    report renders and is plain JSON."""
    import json

    from megacpp_mcore.jsonio import jsonable
    from megacpp_mcore.train.bench import render, run_bench

    settings = BenchSettings(rounds=2, warmup=0, steps=1, families="E", family_depth=1,
                             family_rounds=2, router_fusion=False, tuned_micro_batch=3,
                             profile_steps=0, backend="local", peak_tflops=1.0)
    report = run_bench(parse_pattern("AEMF"), cpu_config(seq_length=16), FP32, 2, settings,
                       log=lambda _: None, device="cpu")
    assert report["errors"] == []
    assert [r["name"] for r in report["runs"]] == ["native", "plugin", "native_tuned",
                                                   "plugin_tuned"]
    for row in report["runs"]:
        assert len(row["round_step_ms"]) == 2
        assert row["tokens_per_step"] == (3 if "tuned" in row["name"] else 2) * 16
    checks = {c["run"]: c for c in report["loss_checks"]}
    assert set(checks) == {"plugin", "native_tuned", "plugin_tuned"}
    assert all(c["passed"] for c in checks.values()), checks
    assert set(report["ratios"]) == {"plugin / native", "plugin_tuned / native",
                                     "plugin_tuned / native_tuned", "native_tuned / native",
                                     "plugin_tuned / plugin"}
    assert report["ratios"]["plugin / native"]["target"] == 1.0
    assert len(report["ratios"]["plugin / native"]["ratios"]) == 2
    assert [r["name"] for r in report["families"]["E"]] == ["E native", "E plugin"]
    text = render(report)
    assert "plugin / native" in text and "target >= 1.00" in text
    assert "E native" not in text and "\nE " in text  # family rows by letter
    json.dumps(jsonable(report))


def test_a_spent_time_budget_ends_the_session_after_whole_rounds(megatron_single_process):
    from megacpp_mcore.train.bench import render, run_bench

    settings = BenchSettings(rounds=3, warmup=0, steps=1, runs=("plugin",), families="A",
                             router_fusion=False, profile_steps=0, backend="local",
                             budget_s=0.0)
    report = run_bench(parse_pattern("AF"), cpu_config(), FP32, 1, settings,
                       log=lambda _: None, device="cpu")
    assert [r["name"] for r in report["runs"]] == ["native", "plugin"]  # native lends weights
    assert all(len(r["round_step_ms"]) == 1 for r in report["runs"])
    assert report["skipped"] == ["rounds 2..3 of native, plugin", "family A"]
    assert report["families"] == {}
    assert len(report["ratios"]["plugin / native"]["ratios"]) == 1
    assert "SKIPPED (time budget) family A" in render(report)


def test_build_model_overrides_reach_megatrons_config(megatron_single_process):
    model = build_model(parse_pattern("AF"), cpu_config(), backend="local", precision=FP32,
                        overrides={"moe_router_fusion": True, "init_method_std": 0.5})
    assert model.config.moe_router_fusion is True and model.config.init_method_std == 0.5
    default = build_model(parse_pattern("AF"), cpu_config(), backend="local", precision=FP32)
    assert default.config.moe_router_fusion is False


def test_tuned_sets_build_plugin_tuned_and_its_family_rows(megatron_single_process):
    """--tuned-set: plugin_tuned (and a plugin_tuned row per family) is built from the tuned
    model settings; the others keep the recipe's; the report shows the third family column."""
    from dataclasses import replace

    from megacpp_mcore.train.bench import render, run_bench

    base = cpu_config(seq_length=16)
    tuned = replace(base, moe=replace(base.moe, expert_gemm="torch"))
    settings = BenchSettings(rounds=1, warmup=0, steps=1, families="E", family_depth=1,
                             family_rounds=1, runs=("plugin", "plugin_tuned"),
                             router_fusion=False, profile_steps=0, backend="local",
                             tuned_sets=("model.moe.expert_gemm=torch",))
    bench = Bench(parse_pattern("AE"), base, FP32, 1, settings, log=lambda _: None,
                  device="cpu", tuned_model=tuned)
    specs = {s.name: s for s in bench.main_specs()}
    assert specs["plugin_tuned"].model is tuned and specs["plugin"].model is None
    report = run_bench(parse_pattern("AE"), base, FP32, 1, settings, log=lambda _: None,
                       device="cpu", tuned_model=tuned)
    assert report["errors"] == []
    assert [r["name"] for r in report["families"]["E"]] == ["E native", "E plugin",
                                                            "E plugin_tuned"]
    assert all(c["passed"] for c in report["loss_checks"])
    assert "plugin_tuned/native" in render(report)
    assert Bench(parse_pattern("AE"), base, FP32, 1, settings, device="cpu",
                 tuned_model=base).tuned_model is None  # nothing tuned: no extra rows


def test_host_split_times_forward_per_family_backward_and_optimizer(megatron_single_process):
    from megacpp_mcore.train.bench import StepRunner
    from megacpp_mcore.train.bench_report import format_host_split

    layout = parse_pattern("AEMF")
    model = build_model(layout, cpu_config(seq_length=16), backend="local", precision=FP32)
    runner = StepRunner("plugin", model, 1, 16, 64, 0, 1.0, letters=layout.canonical)
    runner.host_split(2)
    split = runner.result.host_split
    assert set(split["forward_by_family"]) == set("AEMF")
    assert all(v > 0 for v in split["forward_by_family"].values())
    assert sum(split["forward_by_family"].values()) <= split["forward"]
    assert split["backward"] > 0 and split["optimizer"] > 0
    assert not model.decoder.layers[0]._forward_hooks  # the hooks are gone afterwards
    runner.result.host_ops = [{"op": "aten::mm", "self_ms": 1.5, "calls": 12.0}]
    text = format_host_split([{"name": "plugin", "host_split": split,
                               "host_ops": runner.result.host_ops}])
    assert text.splitlines()[0].split()[:3] == ["host", "ms/step", "forward"]
    assert "aten::mm 1.5 (12x)" in text

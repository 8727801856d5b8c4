"""Attention variants per A position on CPU: the specs the plugin picks per position, the
stack's slot per Megatron symbol, the fail-closed build without CUDA, and the DSA rotation
deviation record (the GPU builds are in tests/gpu/test_nam56r_gpu.py)."""

import argparse
import math

import pytest
import torch
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from megacpp_mcore import backend
from megacpp_mcore.backend import dsa_rotation, resolve_backend
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.megatron.launcher import dsa_rotation_for_this_machine
from megacpp_mcore.model import build_model
from megacpp_mcore.plan import parse_plan, plan_layers
from megacpp_mcore.settings.attention import a_variants, attention_problems
from megacpp_mcore.settings.config import AttentionConfig, PrecisionConfig
from megacpp_mcore.specs.attention import attention_layer_spec
from megacpp_mcore.specs.providers import provider_for
from megacpp_mcore.specs.stack import build_stack_submodules
from tests.conftest import tiny_model_config
from tests.megatron_helpers import mla_attention_on_cpu

SEED_LIKE = AttentionConfig(variant="dsa", mla_ranks=(0, 3), mtp_variant="mla")


def test_variants_by_rank_and_by_layer_agree():
    layout = parse_pattern("AEMEAEMEAEMRA")
    by_rank = a_variants(layout, SEED_LIKE)
    by_layer = a_variants(layout, AttentionConfig(variant="dsa", mla_layers=(1, 13)))
    assert by_rank == by_layer == {1: "mla", 5: "dsa", 9: "dsa", 13: "mla"}
    mtp = parse_pattern("AEMEAEMEAEMRA/AF/AF")
    plan = plan_layers(mtp, tiny_model_config(num_query_groups=None, attention=SEED_LIKE))
    assert plan.megatron_pattern == "+EMED" + "EMED" + "EMG+/+-/+-"
    assert [x.variant for x in plan.layers if x.letter == "A"] == ["mla", "dsa", "dsa", "mla"]
    assert plan.flag.startswith("A:mla E M:mamba2 E A:dsa") and plan.flag.endswith(
        "R:m2rnn A:mla / A:mla F / A:mla F")
    assert parse_plan(plan.flag) == plan  # the flag carries the whole plan


def test_problems_name_positions():
    layout = parse_pattern("AEMA")
    problems = attention_problems(layout, AttentionConfig(variant="mla", dsa_ranks=(2, 5),
                                                          dsa_layers=(3,)))
    text = "\n".join(problems)
    assert "A ranks [2, 5] that do not exist" in text and "ranks 0..1 = layers [1, 4]" in text
    assert "layers [3] that are not A layers (they are ['M'])" in text


def test_local_specs_per_variant():
    local = provider_for("local")
    assert attention_layer_spec(local, "mla").submodules.self_attention.module is (
        MLASelfAttention)
    with pytest.raises(SpecError, match="dsa needs backend te"):
        attention_layer_spec(local, "dsa")
    model = tiny_model_config(num_query_groups=None,
                              attention=AttentionConfig(variant="mla"))
    plan = resolve_backend("local", parse_pattern("AF"), cuda=True)
    sub = build_stack_submodules(parse_pattern("AF"), model, plan)
    assert sub.mla_layer.submodules.self_attention.module is MLASelfAttention
    assert sub.attention_layer is not sub.mla_layer  # gqa slot untouched


def test_mla_fails_closed_without_cuda(megatron_single_process):
    model = tiny_model_config(num_query_groups=None, attention=AttentionConfig(variant="mla"))
    with pytest.raises(SpecError, match=r"mla attention need CUDA.*RotaryEmbedding"):
        build_model(parse_pattern("AF"), model, precision=PrecisionConfig(params_dtype="fp32"))


def test_dsa_rotation_deviation_is_recorded(monkeypatch):
    monkeypatch.setattr(backend, "have_module", lambda name: name != "fast_hadamard_transform")
    assert dsa_rotation(True)[0] is False and "DEVIATION" in dsa_rotation(True)[1]
    assert dsa_rotation(False) == (False, "DSA indexer rotation off (recipe)")
    plan = resolve_backend("local", parse_pattern("AF"), cuda=True,
                           attention_variants={"mla", "dsa"}, dsa_rotate=True)
    record = plan.record()
    assert record["dsa_rotate"] is False and "DEVIATION" in record["families"]["A"]["reason"]
    assert record["families"]["A"]["path"] == "mla+dsa"
    # the launcher turns the rotation off in Megatron's args and keeps what was asked
    from megacpp_mcore.megatron import launcher

    monkeypatch.setattr(launcher, "dsa_rotation", dsa_rotation)
    args = argparse.Namespace(experimental_attention_variant="dsa",
                              dsa_indexer_rotate_activation=True)
    assert "DEVIATION" in dsa_rotation_for_this_machine(args)
    assert args.dsa_indexer_rotate_activation is False and args.megacpp_dsa_rotation_asked
    monkeypatch.setattr(backend, "have_module", lambda name: True)
    args = argparse.Namespace(experimental_attention_variant="dsa",
                              dsa_indexer_rotate_activation=True)
    assert dsa_rotation_for_this_machine(args) is None and args.dsa_indexer_rotate_activation


def test_flex_dispatcher_fails_closed_without_deepep():
    with pytest.raises(SpecError, match=r"flex runs DeepEP.*a CUDA GPU"):
        resolve_backend("local", parse_pattern("AE"), cuda=False, moe_dispatcher="flex")
    if not backend.have_module("deep_ep"):
        with pytest.raises(SpecError, match="deep_ep package"):
            resolve_backend("local", parse_pattern("AE"), cuda=True, moe_dispatcher="flex")


def test_local_mla_runs_with_its_own_key_and_value_widths(megatron_single_process,
                                                          monkeypatch):
    """The plugin's local MLA spec builds and runs: its SDPA core takes MLA's query-key width
    (qk 8 + rope 4) and value width (6) (it refused k_channels before, on any machine)."""
    attention = mla_attention_on_cpu(monkeypatch)
    hidden = torch.randn(10, 2, 64)
    out, _ = attention(hidden, attention_mask=None)
    assert out.shape == (10, 2, 64) and torch.isfinite(out).all()
    assert attention.core_attention.softmax_scale == pytest.approx(1 / math.sqrt(12))

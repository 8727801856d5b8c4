"""Spec structure for every block family and backend, and the backend dispatcher's rules."""

import pytest
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

from megacpp_mcore.backend import FamilyBuild, resolve_backend
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.m2rnn import RecurrentMixer
from megacpp_mcore.layers.mamba2 import Mamba2Mixer
from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layers.sdpa import SDPACoreAttention
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.plan import plan_layers
from megacpp_mcore.settings.config import MambaConfig, MoEConfig
from megacpp_mcore.specs import stack
from megacpp_mcore.specs.attention import attention_layer_spec
from megacpp_mcore.specs.gdn import gdn_layer_spec
from megacpp_mcore.specs.mamba import mamba_layer_spec
from megacpp_mcore.specs.mlp import mlp_layer_spec
from megacpp_mcore.specs.moe import moe_layer_spec
from megacpp_mcore.specs.providers import provider_for
from megacpp_mcore.specs.recurrent import recurrent_layer_spec
from megacpp_mcore.specs.stack import MegacppHybridStack, build_stack_spec
from tests.conftest import tiny_model_config
from tests.spec_trees import attempt, load_golden, normalised, tree

ALL_BUT_G = parse_pattern("AEMFR")


def _plan(built: str, layout=ALL_BUT_G):
    """A plan as the dispatcher would make it on a GPU machine with everything installed."""
    from megacpp_mcore.backend import BackendPlan

    paths = {"M": "fused", "R": "fused", "E": "alltoall"}
    families = {
        letter: FamilyBuild(letter, "x", built, built, paths.get(letter), "test")
        for letter in "AEMFRG" if layout.has(letter)
    }
    return BackendPlan(requested=built, built=built, cuda=True, families=families)


def test_local_specs():
    spec = build_stack_spec(ALL_BUT_G, tiny_model_config(), _plan("local"))
    assert spec.module is MegacppHybridStack
    assert spec.params["layer_plan"] == "A:gqa E M:mamba2 F R:m2rnn"
    sub = spec.submodules
    attention = sub.attention_layer
    assert attention.module is TransformerLayer
    assert attention.submodules.input_layernorm is LocalNorm
    self_attention = attention.submodules.self_attention
    assert self_attention.module is SelfAttention
    assert self_attention.submodules.core_attention is SDPACoreAttention
    assert self_attention.submodules.linear_qkv.__name__ == "ColumnParallelLinear"
    assert sub.moe_layer.module is MoETransformerLayer
    assert sub.moe_layer.submodules.pre_mlp_layernorm is LocalNorm
    assert sub.mlp_layer.module is MLPLayer
    mamba = sub.mamba_layer
    assert mamba.module is MambaLayer and mamba.submodules.norm is LocalNorm
    assert mamba.submodules.mixer.module is MambaMixer  # fused: Megatron's own mixer
    assert mamba.submodules.mixer.params == {"d_conv": 4, "chunk_size": 8}
    reference = build_stack_spec(ALL_BUT_G, tiny_model_config(),
                                 _plan("local").with_path("M", "reference", "test"))
    assert reference.submodules.mamba_layer.submodules.mixer.module is Mamba2Mixer
    recurrent = sub.recurrent_layer
    assert recurrent.module is MambaLayer
    assert recurrent.submodules.mixer.module is RecurrentMixer
    assert recurrent.submodules.mixer.params["num_heads"] == 4
    assert sub.final_norm is LocalNorm


def test_te_specs_use_transformer_engine_modules():
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
    )
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    layout = parse_pattern("AEMFRG")
    sub = build_stack_spec(layout, tiny_model_config(), _plan("te", layout)).submodules
    upstream = hybrid_stack_spec.submodules
    for slot in ("attention_layer", "mlp_layer", "gdn_layer"):  # stock Megatron's own specs
        assert tree(getattr(sub, slot)) == tree(getattr(upstream, slot)), slot
    core = sub.attention_layer.submodules.self_attention.submodules.core_attention
    assert core is TEDotProductAttention
    assert sub.moe_layer.submodules.pre_mlp_layernorm is TENorm
    mixer = sub.mamba_layer.submodules.mixer
    native_mixer = upstream.mamba_layer.submodules.mixer
    assert mixer.module is native_mixer.module is MambaMixer
    assert mixer.submodules == native_mixer.submodules  # TE fused-norm in_proj, TE out_proj
    assert sub.recurrent_layer.submodules.mixer.submodules.in_proj is (
        TELayerNormColumnParallelLinear)
    assert sub.final_norm is TENorm


def test_unused_families_stay_empty():
    from megatron.core.transformer.identity_op import IdentityOp

    sub = build_stack_spec(parse_pattern("MF"), tiny_model_config(), _plan("local")).submodules
    assert sub.attention_layer is IdentityOp and sub.recurrent_layer is IdentityOp


def test_plugin_pattern_encoding():
    layout = parse_pattern("AEM|FRG/MA")
    assert plan_layers(layout).megatron_pattern == "*EM|-GG/M*"
    with pytest.raises(SpecError, match="no Megatron symbol on the native target"):
        plan_layers(layout, target="native")


def test_r_in_mtp_is_refused():
    layout = parse_pattern("AEMR/RA")
    with pytest.raises(SpecError, match="R in multi-token-prediction"):
        build_stack_spec(layout, tiny_model_config(), _plan("local", layout))


# --------------------------------------------------------------------------- golden trees


def _spec_cases(backend: str) -> dict:
    """Every spec the builders make on ``backend`` (one per family, variant, path and experts
    kernel), as trees; a refusal is recorded as its error."""
    model = tiny_model_config()
    provider = provider_for(backend)
    out = {}
    for variant in ("gqa", "mla", "dsa"):
        out[f"attention/{variant}"] = attempt(attention_layer_spec, provider, variant)
    for grouped in (False, True):
        for gemm in ("te", "torch"):
            moe = MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=64, grouped_gemm=grouped,
                            expert_gemm=gemm)
            out[f"moe/grouped_gemm={grouped}/expert_gemm={gemm}"] = attempt(
                moe_layer_spec, provider, moe)
    for path in ("fused", "reference"):
        for variant in ("mamba2", "mamba3"):
            mamba = MambaConfig(state_dim=16, head_dim=16, num_groups=2, chunk_size=8,
                                variant=variant)
            out[f"mamba/{path}/{variant}"] = attempt(mamba_layer_spec, provider, path, mamba)
        out[f"recurrent/{path}"] = attempt(recurrent_layer_spec, provider, path,
                                           model.recurrent)
    out["mamba/fused/mamba3-mimo"] = attempt(
        mamba_layer_spec, provider, "fused", MambaConfig(variant="mamba3", mimo=True))
    out["mlp"] = attempt(mlp_layer_spec, provider)
    out["gdn"] = attempt(gdn_layer_spec, provider)
    out["mtp_block"] = attempt(stack._mtp_block_spec, provider)
    layout = parse_pattern("AEMFRG/AF")
    sub = stack.build_stack_submodules(layout, model, _plan(backend, layout))
    out["stack/final_norm"] = tree(sub.final_norm)
    out["stack/mtp_block"] = tree(sub.mtp_block_spec)
    return out


def _have_transformer_engine() -> bool:
    from megacpp_mcore.backend import have_module

    return have_module("transformer_engine")


@pytest.mark.parametrize("backend", ["local", "te"])
def test_specs_match_the_recorded_trees(backend):
    """Every spec, submodule by submodule, is the one recorded in tests/assets/spec_trees.json
    (recorded from the builders before they took provider objects). The te trees were
    recorded against Megatron's TE placeholders (no Transformer Engine on the CPU machine):
    with TE installed its grouped experts differ, and the te trees are checked against
    Megatron's own hybrid spec below instead."""
    if backend == "te" and _have_transformer_engine():
        pytest.skip("the te trees were recorded with Megatron's TE placeholders")
    golden = load_golden()[backend]
    built = normalised(_spec_cases(backend))
    assert built.keys() == golden.keys()
    for name in golden:
        assert built[name] == golden[name], f"{backend} {name} differs from the recorded spec"


def test_te_specs_are_megatrons_hybrid_specs():
    """The te specs are Megatron's own hybrid-stack specs, submodule by submodule (the Mamba
    mixer differs only in the plugin's mixer params)."""
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    upstream = hybrid_stack_spec.submodules
    layout = parse_pattern("AEMFG/AF")
    model = tiny_model_config(moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=64))
    ours = stack.build_stack_submodules(layout, model, _plan("te", layout))
    for slot in ("attention_layer", "mlp_layer", "gdn_layer", "moe_layer", "mtp_block_spec"):
        assert tree(getattr(ours, slot)) == tree(getattr(upstream, slot)), slot
    for variant, slot in (("mla", "mla_layer"), ("dsa", "dsa_layer")):
        built = attention_layer_spec(provider_for("te"), variant)
        assert tree(built) == tree(getattr(upstream, slot)), variant
    mixer, native = ours.mamba_layer.submodules.mixer, upstream.mamba_layer.submodules.mixer
    assert tree(mixer.submodules) == tree(native.submodules)
    assert tree(mixer.module) == tree(native.module)


# --------------------------------------------------------------------------- HybridStack

#: sha256 of inspect.getsource of what MegacppHybridStack ports, for megatron-core 0.19.2
UPSTREAM_SOURCES = {
    "__init__": "8f31e2dfaa3491fa9849cbf2825c9d42f089a49293ea832819c38290ca0db1e3",
    "_fuse_mla_down_proj": "f7087be434c38b5aa60faf5263ffddbea29ba25aace4080e316328a76c91d3cd",
}


@pytest.mark.parametrize("method", sorted(UPSTREAM_SOURCES))
def test_upstream_hybrid_stack_constructor_is_the_one_ported(method):
    import hashlib
    import inspect

    from megatron.core.models.hybrid.hybrid_block import HybridStack

    source = inspect.getsource(getattr(HybridStack, method))
    assert hashlib.sha256(source.encode()).hexdigest() == UPSTREAM_SOURCES[method], (
        f"megatron-core's HybridStack.{method} changed: re-check what MegacppHybridStack "
        "ports (specs/stack.py) and update the hash")


def _build(layout: str, **overrides):
    from megacpp_mcore.model import build_model
    from megacpp_mcore.settings.config import PrecisionConfig

    return build_model(parse_pattern(layout), tiny_model_config(),
                       precision=PrecisionConfig(params_dtype="fp32"), overrides=overrides)


@pytest.mark.parametrize(("setting", "context"), [("fp8", "get_fp8_context"),
                                                  ("fp4", "get_fp4_context")])
def test_layers_are_built_in_the_quantised_init_context(megatron_single_process, monkeypatch,
                                                        setting, context):
    """As upstream: each layer is built inside get_fp8_context / get_fp4_context(config,
    global layer index, is_init=True); the final norm outside it."""
    from contextlib import contextmanager

    entered, active, built = [], [], []

    @contextmanager
    def recording(config, layer_no=-1, is_init=False):
        entered.append((layer_no, is_init))
        active.append(layer_no)
        try:
            yield
        finally:
            active.pop()

    build_module = stack.build_module

    def recording_build(spec, *args, **kwargs):
        built.append(active[-1] if active else None)
        return build_module(spec, *args, **kwargs)

    monkeypatch.setattr(stack, context, recording)
    monkeypatch.setattr(stack, "build_module", recording_build)
    value = {"fp8": "hybrid", "fp4": "nvfp4"}[setting]
    model = _build("AMFRA", **{setting: value})
    assert len(model.decoder.layers) == 5
    assert entered == [(i, True) for i in range(5)]
    assert built == [0, 1, 2, 3, 4, None]  # five layers, each in its context; the final norm


def test_no_quantised_init_context_without_fp8_or_fp4(megatron_single_process, monkeypatch):
    calls = []
    monkeypatch.setattr(stack, "get_fp8_context", lambda *args, **kw: calls.append(args))
    monkeypatch.setattr(stack, "get_fp4_context", lambda *args, **kw: calls.append(args))
    _build("AF")
    assert calls == []


def test_local_cuda_graphs_annotate_the_first_and_last_layer(megatron_single_process):
    """cuda_graph_impl="local": annotate_first_last_layer, as upstream. (Graphing only
    attention, which this layout has none of, so no layer needs CUDA graphs on the CPU.)"""
    model = _build("MFRM", cuda_graph_impl="local", cuda_graph_modules=["attn"])
    layers = model.decoder.layers
    assert [layer.is_first_layer for layer in layers] == [True, False, False, False]
    assert [layer.is_last_layer for layer in layers] == [False, False, False, True]
    plain = _build("MFRM").decoder.layers
    assert not any(hasattr(layer, "is_first_layer") for layer in plain)


def _mla_fusion_stack(transformer_impl: str, layout: str):
    """The plugin's stack for ``layout`` with an MLA config asking for the down-projection
    fusion: the fusion is decided before any layer is built."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import MLATransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    config = MLATransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6, add_bias_linear=False,
        use_cpu_initialization=True, rope_type="rope", normalization="RMSNorm",
        transformer_impl=transformer_impl, mla_down_proj_fusion=True)
    parsed = parse_pattern(layout)
    backend = "te" if transformer_impl == "transformer_engine" else "local"
    spec = build_stack_spec(parsed, tiny_model_config(), _plan(backend, parsed))
    return build_module(spec, config=config, layer_type_list=["-"] * parsed.depth,
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def test_mla_down_proj_fusion_is_refused_where_it_cannot_be_done(megatron_single_process):
    with pytest.raises(SpecError, match="mla_down_proj_fusion needs backend te"):
        _mla_fusion_stack("local", "F")
    with pytest.raises(SpecError, match="mla_down_proj_fusion: the model has no MLA layer"):
        _mla_fusion_stack("transformer_engine", "F")


# --------------------------------------------------------------------------- dispatcher


def test_auto_on_cpu_builds_local_reference_paths():
    plan = resolve_backend("auto", parse_pattern("AEMFR"), cuda=False)
    assert plan.built == "local"
    assert plan.path("M") == "reference" and plan.path("R") == "reference"
    assert plan.path("E") == "allgather"  # alltoall needs CUDA streams
    record = plan.record()
    assert record["families"]["M"]["requested"] == "auto"
    assert record["families"]["M"]["built"] == "local"
    assert "no CUDA" in record["families"]["R"]["reason"]


def test_te_needs_cuda():
    with pytest.raises(SpecError, match="backend te needs Transformer Engine and a CUDA GPU"):
        resolve_backend("te", ALL_BUT_G, cuda=False)


def test_unknown_backend():
    with pytest.raises(SpecError, match="accepted: auto, te, local"):
        resolve_backend("fast", ALL_BUT_G)


def _machine(monkeypatch, *, fla: bool):
    """The dispatcher's view of a CUDA machine with or without flash-linear-attention (the
    backend's own package probe, so the outcome does not depend on this machine)."""
    from megacpp_mcore import backend

    probe = backend.have_module
    monkeypatch.setattr(backend, "have_module",
                        lambda name: fla if name == "fla" else probe(name))


def test_g_fails_closed_naming_layers(monkeypatch):
    _machine(monkeypatch, fla=False)
    layout = parse_pattern("AGMG/GA")
    with pytest.raises(SpecError) as info:  # a GPU machine without flash-linear-attention
        resolve_backend("auto", layout, cuda=True)
    message = str(info.value)
    assert "G layers 2, 4, mtp1:1" in message
    assert "flash-linear-attention" in message
    with pytest.raises(SpecError, match="need a CUDA GPU"):
        resolve_backend("auto", parse_pattern("AGMG"), cuda=False)


def test_g_builds_where_flash_linear_attention_and_cuda_are(monkeypatch):
    _machine(monkeypatch, fla=True)
    plan = resolve_backend("local", parse_pattern("AGMG"), cuda=True)
    assert plan.families["G"].built == "local" and plan.families["G"].family == "gated_deltanet"


def test_mtp_needs_cuda():
    with pytest.raises(SpecError, match=r"multi-token prediction .* needs CUDA"):
        resolve_backend("auto", parse_pattern("AEMF/MA"), cuda=False)

"""Model FLOPs: each family against hand arithmetic, the model total, MFU, and Megatron's own.

Tiny config used throughout: hidden h = 8, 2 query heads, 1 query group, head dim d = 4,
sequence s = 16, ffn 24, vocab 32. Every expected number below is written out by hand.
"""

from argparse import Namespace

import pytest

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.settings.config import (
    GatedDeltaNetConfig,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    RecurrentConfig,
)
from megacpp_mcore.train import flops


def tiny(**overrides) -> ModelConfig:
    base = dict(
        hidden_size=8,
        ffn_hidden_size=24,
        num_attention_heads=2,
        num_query_groups=1,
        vocab_size=32,
        seq_length=16,
        activation="swiglu",
        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=6, shared_expert_ffn_hidden_size=12),
        mamba=MambaConfig(state_dim=3, head_dim=4, num_groups=2, num_heads=None, conv_kernel=4),
        recurrent=RecurrentConfig(num_heads=2, k_head_dim=4, v_head_dim=2, conv_kernel=4),
        gdn=GatedDeltaNetConfig(
            num_key_heads=1, num_value_heads=2, key_head_dim=4, value_head_dim=2, conv_kernel=4
        ),
    )
    base.update(overrides)
    return ModelConfig(**base)


# --------------------------------------------------------------------------- per family


def test_attention():
    # QKV: 2*h*(nq*d + 2*ng*d) = 2*8*(2*4 + 2*1*4) = 16*16 = 256
    # core (causal, halved): 2*2*s*nq*d/2 = 2*16*8 = 256
    # out: 2*nq*d*h = 2*8*8 = 128
    assert flops.attention_flops(tiny()) == 256 + 256 + 128 == 640
    # the core term scales with the sequence: s = 32 -> 512
    assert flops.attention_flops(tiny(), seq_length=32) == 256 + 512 + 128
    # kv_channels overrides hidden/heads: d = 3 -> QKV 2*8*(6 + 6) = 192, core 2*16*6 = 192,
    # out 2*6*8 = 96
    assert flops.attention_flops(tiny(kv_channels=3)) == 192 + 192 + 96


def test_mlp():
    # swiglu: 3 matrices, 2*h*ffn*3 = 2*8*24*3 = 1152
    assert flops.mlp_flops(tiny()) == 1152
    # squared_relu / gelu: 2 matrices, 2*8*24*2 = 768
    assert flops.mlp_flops(tiny(activation="squared_relu")) == 768
    assert flops.mlp_flops(tiny(activation="gelu")) == 768


def test_moe():
    # router 2*h*E = 2*8*4 = 64; routed top_k * 2*h*6*3 = 2*288 = 576; shared 2*8*12*3 = 576
    assert flops.moe_flops(tiny()) == 64 + 576 + 576 == 1216
    no_shared = MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=6)
    assert flops.moe_flops(tiny(moe=no_shared)) == 64 + 576
    # gelu experts: 2 matrices: routed 2*(2*8*6*2) = 384, shared 2*8*12*2 = 384
    assert flops.moe_flops(tiny(activation="gelu")) == 64 + 384 + 384


def test_mamba():
    # heads = 2*h/P = 2*8/4 = 4, d_inner = 4*4 = 16, G = 2, N = 3, w = 4
    # in_proj 2*h*(2*d_inner + 2*G*N + heads) = 16*(32 + 12 + 4) = 768
    # conv 2*w*(d_inner + 2*G*N) = 8*(16 + 12) = 224
    # scan 2*2*d_inner*N + 2*d_inner*N = 6*16*3 = 288
    # out_proj 2*d_inner*h = 2*16*8 = 256
    assert flops.mamba_flops(tiny()) == 768 + 224 + 288 + 256 == 1536
    # explicit heads: 2 heads -> d_inner 8: in 16*(16 + 12 + 2) = 480, conv 8*(8 + 12) = 160,
    # scan 6*8*3 = 144, out 2*8*8 = 128
    explicit = MambaConfig(state_dim=3, head_dim=4, num_groups=2, num_heads=2, conv_kernel=4)
    assert flops.mamba_flops(tiny(mamba=explicit)) == 480 + 160 + 144 + 128


def test_mamba3():
    # heads 4, d_inner 16, G = 2, N = 4, rope_fraction 0.5 -> 1 angle; no conv
    # in_proj 2*h*(2*d_inner + 2*G*N + 3*heads + angles) = 16*(32 + 16 + 12 + 1) = 976
    # scan 8*d_inner*N = 8*16*4 = 512 (two outer products, decay, readout); out_proj 256
    mamba3 = MambaConfig(variant="mamba3", state_dim=4, head_dim=4, num_groups=2)
    assert flops.mamba_flops(tiny(mamba=mamba3)) == 976 + 512 + 256


def test_recurrent():
    # H = 2, K = 4, V = 2, w = 4, h = 8
    # in_proj 2*h*H*(2K + 2V + 1) = 2*8*2*13 = 416
    # conv 2*w*H*(2K + V) = 2*4*2*10 = 160
    # per head: h@W 2*K*V*V = 32, k(x)v K*V = 8, blend 3*K*V = 24, readout 2*K*V = 16 -> 80;
    # x 2 heads = 160
    # out_proj 2*H*V*h = 2*2*2*8 = 64
    assert flops.recurrent_flops(tiny()) == 416 + 160 + 160 + 64 == 800


def test_gated_deltanet():
    # Hk = 1, Dk = 4 -> qk_dim 4; Hv = 2, Dv = 2 -> v_dim 4; w = 4; h = 8
    # in_proj 2*h*(2*qk + 2*v + 2*Hv) = 16*(8 + 8 + 4) = 320
    # conv 2*w*(2*qk + v) = 8*12 = 96
    # delta rule 4 * 2*Hv*Dk*Dv = 8*2*4*2 = 128
    # out_proj 2*v_dim*h = 2*4*8 = 64
    assert flops.gdn_flops(tiny()) == 320 + 96 + 128 + 64 == 608


# --------------------------------------------------------------------------- the model


def test_model_total_with_output_layer():
    # "AF" x 1: 640 + 1152 + logits 2*h*V = 2*8*32 = 512 -> forward 2304, training x3 = 6912
    layout = parse_pattern("AF")
    assert flops.flops_breakdown(layout, tiny()).forward == 2304
    assert flops.model_flops_per_token(layout, tiny()) == 3 * 2304 == 6912
    # Megatron's padded vocab (128): logits 2*8*128 = 2048
    assert flops.model_flops_per_token(layout, tiny(), vocab_size=128) == 3 * (1792 + 2048)
    # every family once: 640 + 1216 + 1536 + 1152 + 800 + 608 + 512
    every = parse_pattern("AEMFRG")
    breakdown = flops.flops_breakdown(every, tiny())
    assert breakdown.per_letter == {
        "A": 640,
        "E": 1216,
        "M": 1536,
        "F": 1152,
        "R": 800,
        "G": 608,
    }
    assert breakdown.forward == 640 + 1216 + 1536 + 1152 + 800 + 608 + 512
    # tiling counts each layer: "AF" at depth 4 is two A and two F
    assert flops.model_flops_per_token(parse_pattern("AF", 4), tiny()) == 3 * (
        2 * 640 + 2 * 1152 + 512
    )


def test_mtp_depths():
    # main "AF": 640 + 1152 + 512 = 2304. Each MTP depth "F": its layer 1152, projection
    # 2*(2h)*h = 2*16*8 = 256, its own output layer 512 -> 1920 per depth.
    one = parse_pattern("AF/F")
    assert flops.flops_breakdown(one, tiny()).mtp == 1152 + 256 + 512
    assert flops.model_flops_per_token(one, tiny()) == 3 * (2304 + 1920)
    two = parse_pattern("AF/F/F")
    assert flops.model_flops_per_token(two, tiny()) == 3 * (2304 + 2 * 1920)


def test_throughput_peak_and_mfu():
    # 1e9 FLOP/token x 8e6 tokens/s = 8e15 FLOP/s over 8 GPUs = 1e15 = 1000 TFLOP/s per GPU
    assert flops.tflops_per_gpu(1e9, 8e6, num_gpus=8) == pytest.approx(1000.0)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_tflops("Some CPU") is None
    assert flops.peak_tflops(None) is None
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", override=790.0) == 790.0
    assert flops.mfu(494.5, 989.0) == pytest.approx(0.5)
    assert flops.mfu(100.0, None) is None
    with pytest.raises(ValueError):
        flops.mfu(1.0, 0.0)
    with pytest.raises(ValueError):
        flops.tflops_per_gpu(1.0, 1.0, num_gpus=0)


# --------------------------------------------------------------------------- against Megatron

GPT = dict(
    seq_length=64,
    hidden_size=64,
    ffn_hidden_size=160,
    num_attention_heads=8,
    num_query_groups=2,
    kv_channels=16,
    padded_vocab_size=384,
)


def megatron_args(**overrides) -> Namespace:
    args = Namespace(
        **GPT,
        num_layers=3,
        group_query_attention=True,
        num_experts=None,
        mtp_num_layers=None,
        moe_ffn_hidden_size=None,
        moe_latent_size=None,
        moe_shared_expert_intermediate_size=None,
        moe_router_topk=2,
        swiglu=True,
        multi_latent_attention=False,
        attention_output_gate=False,
        experimental_attention_variant=None,
        hybrid_layer_pattern=None,
        mamba_state_dim=16,
        mamba_head_dim=16,
        mamba_num_groups=2,
        mamba_num_heads=None,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_conv_kernel_dim=4,
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def gpt_model(**overrides) -> ModelConfig:
    fields = {k: v for k, v in GPT.items() if k != "padded_vocab_size"}
    fields.update(
        vocab_size=384,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=48, shared_expert_ffn_hidden_size=32),
        mamba=MambaConfig(state_dim=16, head_dim=16, num_groups=2, num_heads=None, conv_kernel=4),
        gdn=GatedDeltaNetConfig(
            num_key_heads=2, num_value_heads=4, key_head_dim=32, value_head_dim=32, conv_kernel=4
        ),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture(scope="module")
def megatron_flops():
    from megatron.training.training import num_floating_point_operations

    return num_floating_point_operations


@pytest.mark.parametrize("swiglu", [True, False])
def test_gpt_layout_matches_megatron(megatron_flops, swiglu):
    """A pure A+F (GPT) layout: identical to Megatron's transformer formula (causal halved)."""
    batch = 3
    model = gpt_model(activation="swiglu" if swiglu else "gelu")
    ours = flops.model_flops_per_token(parse_pattern("AF", 6), model) * batch * GPT["seq_length"]
    theirs = megatron_flops(megatron_args(swiglu=swiglu), batch)
    assert ours == pytest.approx(theirs, rel=1e-12)
    # Megatron's hybrid formula agrees for the same layout ("*-" x 3)
    hybrid = megatron_flops(megatron_args(swiglu=swiglu, hybrid_layer_pattern="*-*-*-"), batch)
    assert ours == pytest.approx(hybrid, rel=1e-12)


def test_gpt_mtp_differs_from_megatron_only_by_norms(megatron_flops):
    """With MTP, Megatron's GPT formula also counts 3h "norm" FLOPs per depth; we count no
    norms anywhere: difference = 3 (fwd+bwd) * 2 (FMA) * 3h per token and depth."""
    batch, h = 2, GPT["hidden_size"]
    ours = flops.model_flops_per_token(parse_pattern("AF/AF", 6), gpt_model())
    theirs = megatron_flops(megatron_args(mtp_num_layers=1), batch) / (batch * GPT["seq_length"])
    assert theirs - ours == pytest.approx(3 * 2 * 3 * h, rel=1e-9)


def test_hybrid_layout_differences_from_megatron(megatron_flops):
    """Every Megatron family in one hybrid pattern; the documented differences, by hand.

    Per token, training (x3), h = 64, s = 64:
      E: we count the router, 2*h*num_experts = 2*64*8 = 1024 per MoE layer.
      M: d_inner = 2h = 128, N = 16, G = 2: we add the conv 2*w*(d_inner + 2*G*N) =
         2*4*(128 + 64) = 1536 and count the scan as 6*d_inner*N = 12288 where Megatron
         counts 7*d_in*N = 14336: net 1536 - 2048 = -512 per Mamba layer.
      G: with Dk == Dv, identical.
      MTP: we add the projection 2*(2h)*h = 16384 per depth (Megatron's hybrid formula
         leaves it out).
    """
    batch, s, h = 2, GPT["seq_length"], GPT["hidden_size"]
    layout = parse_pattern("AFMFEFGF/AF")
    ours = flops.model_flops_per_token(layout, gpt_model())
    args = megatron_args(
        hybrid_layer_pattern="*-M-E-G-/*-",
        mtp_num_layers=1,
        num_experts=8,
        moe_ffn_hidden_size=48,
        moe_shared_expert_intermediate_size=32,
    )
    theirs = megatron_flops(args, batch) / (batch * s)
    router = 2 * h * 8
    mamba = 2 * 4 * (128 + 2 * 2 * 16) + (6 - 7) * 128 * 16
    mtp_projection = 2 * (2 * h) * h
    assert ours - theirs == pytest.approx(3 * (router + mamba + mtp_projection), rel=1e-9)


def test_attention_variants_are_counted_per_position():
    """MLA by hand; DSA = MLA with top-k keys + indexer; a layout's A layers are counted
    as the variant each position is built as."""
    from megacpp_mcore.layout import parse_pattern
    from megacpp_mcore.settings.config import AttentionConfig, DSAConfig, MLAConfig

    mla = MLAConfig(q_lora_rank=8, kv_lora_rank=4, qk_head_dim=2, qk_pos_emb_head_dim=2,
                    v_head_dim=3)
    dsa = DSAConfig(indexer_heads=2, indexer_head_dim=2, top_k=4)
    model = tiny(attention=AttentionConfig(variant="dsa", mla_ranks=(0,), mla=mla, dsa=dsa))
    h, nq, s = model.hidden_size, model.num_attention_heads, model.seq_length
    q = 2 * (h * 8 + 8 * nq * 4)
    kv = 2 * h * (4 + 2) + 2 * 4 * nq * (2 + 3)
    core = 2 * (s / 2) * nq * (4 + 3)
    assert flops.mla_flops(model) == q + kv + core + 2 * nq * 3 * h
    keys = 4 - 16 / (2 * s) if s > 4 else s / 2
    indexer = 2 * 8 * 2 * 2 + 2 * h * 2 + 2 * h * 2 + 2 * (s / 2) * 2 * 2
    assert flops.dsa_flops(model) == q + kv + 2 * keys * nq * 7 + 2 * nq * 3 * h + indexer
    layout = parse_pattern("AFAF")  # A ranks 0 (mla) and 1 (dsa)
    got = flops.flops_breakdown(layout, model).per_letter["A"]
    assert got == flops.mla_flops(model) + flops.dsa_flops(model)

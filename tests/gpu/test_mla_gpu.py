"""Multi-latent attention on one GPU, against Megatron's Transformer Engine MLA.

* The plugin's local MLA spec (Megatron's local linears, a torch norm, SDPA core attention)
  computes what Megatron's TE MLA computes: the same weights (the TE layer's state dict,
  copied across) and the same input give the same output and the same gradient of every
  parameter and of the input (fp32).
* ``mla_down_proj_fusion`` on the te backend (``MegacppHybridStack`` ports upstream's
  ``_fuse_mla_down_proj``): the layer becomes ``FusedMLASelfAttention`` with one TE
  LayerNormColumnParallelLinear for the input norm and the q/kv down projections, and computes
  what the unfused layer computes with the same weights.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_mla_gpu.py``.
"""

import pytest
import torch

from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import (
    AttentionConfig,
    MLAConfig,
    ModelConfig,
    PrecisionConfig,
)
from tests.compare import rel_err
from tests.gpu.test_model_gpu import _layer_outputs_and_grads, _reseed

pytestmark = pytest.mark.gpu
FP32 = PrecisionConfig(params_dtype="fp32")
SEQ, BATCH = 256, 2

# Local vs TE, fp32. Transformer Engine runs fp32 GEMMs in TF32 whatever torch's flags say
# (see tests/gpu/test_tensor_parallel_gpu.py); the local layer's GEMMs are fp32 (torch's
# default, TF32 off). TF32 rounds each GEMM operand to 10 mantissa bits (unit roundoff
# 2^-11 ~ 4.9e-4), so one TF32 GEMM differs from its fp32 twin by a few 1e-4 relative. That
# is the TP test's 5e-4 budget, which compares TF32 with TF32 (operands rounded alike); here
# one side is not rounded at all and the layer chains three GEMMs forward (down, up, output
# projection) and as many again backward, so a correct layer lands near 1e-3 at most. A wrong
# weight mapping, softmax scale, rotary split or mask is off by 1e-2 or (far) more.
LOCAL_VS_TE = 2e-3
# Fused vs unfused down projection, both TE (TF32 operands rounded alike on both sides): only
# the GEMM's shape and accumulation order differ.
FUSED_VS_UNFUSED = 5e-4


def mla_model_config() -> ModelConfig:
    mla = MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=32,
                    v_head_dim=32)
    return ModelConfig(
        hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=None,
        vocab_size=512, seq_length=SEQ, attention=AttentionConfig(variant="mla", mla=mla))


def _mla_model(backend: str, **overrides):
    """A one-layer (A: MLA) model on ``backend``; its layer is ``model.decoder.layers[0]``."""
    _reseed()
    model = build_model(parse_pattern("A"), mla_model_config(), backend=backend,
                        precision=FP32, overrides=overrides or None)
    assert model.backend_record["families"]["A"]["built"] == backend
    return model


def _weights(layer) -> dict[str, torch.Tensor]:
    """The layer's parameters and buffers by name, without TE's ``_extra_state`` (FP8
    metadata, not weights)."""
    return {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}


def _load(layer, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` into ``layer``: every weight of it must be there, nothing more."""
    state = layer.state_dict()
    assert set(_weights(layer)) == set(weights), (set(_weights(layer)) ^ set(weights))
    state.update(weights)
    layer.load_state_dict(state, strict=True)


def _outputs_and_grads(model):
    """The layer's output, the gradient of every parameter (by name) and of the input, for
    one fixed input and one fixed random linear functional of the output (seeded: the same
    on both sides of a comparison)."""
    gen = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(SEQ, BATCH, mla_model_config().hidden_size, device="cuda",
                         generator=gen).requires_grad_()
    return _layer_outputs_and_grads(model, hidden)


def test_local_mla_matches_te_mla(megatron_gpu):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megacpp_mcore.layers.sdpa import SDPACoreAttention

    te_model, local_model = _mla_model("te"), _mla_model("local")
    te, local = te_model.decoder.layers[0], local_model.decoder.layers[0]
    assert type(te.self_attention) is type(local.self_attention) is MLASelfAttention
    assert isinstance(te.self_attention.core_attention, TEDotProductAttention)
    assert isinstance(local.self_attention.core_attention, SDPACoreAttention)
    # TE's MLA layer keeps its input norm apart (TENorm) and names every weight as the local
    # layer does, so the TE state dict maps across name for name; loading checks the sets.
    _load(local, _weights(te))
    out_te, grads_te, dx_te = _outputs_and_grads(te_model)
    out_local, grads_local, dx_local = _outputs_and_grads(local_model)
    assert set(grads_te) == set(grads_local)
    errors = {"output": rel_err(out_local, out_te), "input grad": rel_err(dx_local, dx_te)}
    errors.update({name: rel_err(grads_local[name], grads_te[name]) for name in grads_te})
    print("local vs te MLA", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < LOCAL_VS_TE, errors


def test_mla_down_proj_fusion_on_te_computes_the_unfused_layer(megatron_gpu):
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import FusedMLASelfAttention

    plain_model = _mla_model("te")
    fused_model = _mla_model("te", mla_down_proj_fusion=True)
    plain, fused = plain_model.decoder.layers[0], fused_model.decoder.layers[0]
    assert type(fused.self_attention) is FusedMLASelfAttention
    assert isinstance(fused.input_layernorm, IdentityOp)
    assert isinstance(fused.self_attention.linear_qkv_down_proj, TELayerNormColumnParallelLinear)
    # The unfused weights in the fused layout: the input norm's weight inside the fused
    # linear, the q and kv down projections stacked (q first, as FusedMLASelfAttention splits).
    src, prefix = _weights(plain), "self_attention."
    q_down, kv_down = (src.pop(f"{prefix}{n}.weight")
                       for n in ("linear_q_down_proj", "linear_kv_down_proj"))
    src[f"{prefix}linear_qkv_down_proj.weight"] = torch.cat([q_down, kv_down], dim=0)
    src[f"{prefix}linear_qkv_down_proj.layer_norm_weight"] = src.pop("input_layernorm.weight")
    _load(fused, src)
    out_plain, grads_plain, dx_plain = _outputs_and_grads(plain_model)
    out_fused, grads_fused, dx_fused = _outputs_and_grads(fused_model)
    grads_plain[f"{prefix}linear_qkv_down_proj.weight"] = torch.cat(
        [grads_plain.pop(f"{prefix}{n}.weight")
         for n in ("linear_q_down_proj", "linear_kv_down_proj")], dim=0)
    grads_plain[f"{prefix}linear_qkv_down_proj.layer_norm_weight"] = grads_plain.pop(
        "input_layernorm.weight")
    assert set(grads_plain) == set(grads_fused)
    errors = {"output": rel_err(out_fused, out_plain), "input grad": rel_err(dx_fused, dx_plain)}
    errors.update({name: rel_err(grads_fused[name], grads_plain[name]) for name in grads_plain})
    print("fused vs unfused MLA down projection", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < FUSED_VS_UNFUSED, errors

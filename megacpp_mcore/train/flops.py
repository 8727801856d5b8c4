"""Model FLOPs: forward FLOPs per token for each block family, training FLOPs per token, MFU.

Conventions (the same for every family):

- A multiply-add is 2 FLOPs; a matrix ``[m, k] @ [k, n]`` costs ``2 m k n``.
- Training = 3 x forward (forward, then backward = 2 x forward: data and weight gradients).
- These are *model* FLOPs: activation recompute is not counted, so MFU does not reward
  recomputation (as in the PaLM paper's MFU and Megatron's ``num_floating_point_operations``).
- Causal attention is halved: ``QK^T`` and ``softmax(QK^T) V`` each cost ``2 * s * nq * d``
  per token over a full ``s x s`` score matrix, and only the lower triangle is needed, so
  the core counts ``2 * 2 * s * nq * d / 2 = 2 * s * nq * d`` per token (forward). This is
  also what Megatron-Core counts (``transformer_flops``: "/ 2 causal mask";
  ``hybrid_flops``: "causal mask -> /2 cancels with FMA *2").
- Weight matmuls are counted; norms, biases, activations, softmax, rotary embeddings,
  residual adds, gating nonlinearities, the Mamba D-skip and gated RMSNorm are elementwise
  O(width) work and are *not* counted (each is < 1% of a layer at real widths). The
  embedding lookup is free; the output layer (logits) costs ``2 * h * vocab``.
- Recurrent scans (M, R, G) are counted as the per-token recurrence, not as a particular
  kernel's chunked algorithm, so the figure does not depend on chunk size or kernel choice.

Per family, forward FLOPs per token (h = hidden size, s = sequence length):

A  attention, per position as built (model.attention):
   gqa (nq heads, ng query groups, head dim d)
     QKV projection 2*h*(nq*d + 2*ng*d) + core 2*s*nq*d (causal, halved) + output 2*nq*d*h
   mla (q/kv LoRA ranks qr/kvr, qk dim dqk + rope dim dr, v dim dv): q down/up
     2*(h*qr + qr*nq*(dqk+dr)), kv down 2*h*(kvr+dr), kv up 2*kvr*nq*(dqk+dv), core over
     s/2 keys 2*(s/2)*nq*(dqk+dr+dv), output 2*nq*dv*h
   dsa: mla with the core over the top-k keys each query attends, plus the indexer
     (see ``dsa_flops``)
F  dense MLP: swiglu 2*h*ffn*3 (gate, up, down); squared_relu / gelu 2*h*ffn*2
E  MoE: router 2*h*num_experts + top_k x MLP(moe ffn) + shared-expert MLP(shared ffn);
     experts use the model's activation, like F
M  Mamba-2 (Megatron MambaMixer; nheads, headdim P, d_inner = nheads*P, ngroups G,
     state N, conv width w)
     in_proj 2*h*(2*d_inner + 2*G*N + nheads) (z, x, B, C, dt)
     depthwise conv 2*w*(d_inner + 2*G*N)
     scan (recurrence) per head and token: state update h = a*h + x (x) B as two
     multiply-adds per state element, 2*2*P*N, and the readout y = C . h, 2*P*N:
     6 * d_inner * N in all
     out_proj 2*d_inner*h
R  recurrent (M2RNN; H heads, K = k_head_dim, V = v_head_dim, conv width w; QK = H*K, or
   K when q and k are one head shared by all heads, as the layer builds them)
     in_proj 2*h*(2*QK + 2*H*V + H) (q, k, v, gate g, forget f)
     depthwise conv 2*w*(2*QK + H*V) (over q, k, v)
     recurrence per head: h @ W 2*K*V*V, outer product k (x) v K*V, gate blend
     f*h + (1-f)*h_new counted as 3*K*V elementwise, readout q . h 2*K*V:
     H*(2*K*V*V + 6*K*V)
     out_proj 2*H*V*h
G  Gated DeltaNet (Megatron's ``GatedDeltaNet``; Hk key heads of dim Dk, Hv value heads of
     dim Dv, conv width w)
     in_proj 2*h*(2*Hk*Dk + 2*Hv*Dv + 2*Hv) (q, k, v, output gate z, beta, alpha)
     depthwise conv 2*w*(2*Hk*Dk + Hv*Dv) (over q, k, v)
     delta rule per value head: four Dk x Dv matrix-vector products (retrieve S k, the
     rank-1 delta update, the decayed state, readout S q), 4*2*Dk*Dv:
     8*Hv*Dk*Dv, Megatron's own estimate generalised to Dk != Dv
     out_proj 2*Hv*Dv*h

MTP: each multi-token-prediction depth adds its part's layers, the projection of the
concatenated [embedding, hidden] 2*(2h)*h, and its own output layer 2*h*vocab.

Known differences from Megatron-Core's ``num_floating_point_operations`` (checked
in tests/test_flops.py): for A and F layers it is identical; Megatron does not count the MoE
router, the Mamba conv, and counts the Mamba scan as ``7 * d_in * N`` with ``d_in = 2h``
fixed (we count ``6 * d_inner * N`` with the configured heads); its hybrid formula leaves
out the MTP projection; it has no R family.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from megacpp_mcore.layout import FAMILIES, Layout
from megacpp_mcore.plan import ModelPlan, plan_layers
from megacpp_mcore.settings.config import ModelConfig

#: training FLOPs = this x forward FLOPs (forward + backward, no recompute).
TRAINING_MULTIPLIER = 3

#: Dense (no sparsity) BF16 tensor-core peaks, TFLOP/s per GPU, from NVIDIA's data sheets
#: (their headline figures are "with sparsity", twice these). Matched in this order against
#: the GPU name torch reports (``torch.cuda.get_device_name()``), case-insensitively.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    "H200": 989.0,  # SXM
    "GH200": 989.0,
    "A100": 312.0,
}


# --------------------------------------------------------------------------- per family


def _mlp(h: int, ffn: int, activation: str) -> float:
    matrices = 3 if activation == "swiglu" else 2
    return 2.0 * h * ffn * matrices


def attention_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """A: forward FLOPs per token of a causal GQA self-attention layer."""
    h, d = model.hidden_size, model.head_dim
    nq, ng = model.num_attention_heads, model.query_groups
    s = model.seq_length if seq_length is None else seq_length
    qkv = 2.0 * h * (nq * d + 2 * ng * d)
    core = 2.0 * 2.0 * s * nq * d / 2  # QK^T and AV, causal half
    out = 2.0 * nq * d * h
    return qkv + core + out


def mla_flops(model: ModelConfig, seq_length: int | None = None,
              keys_per_query: float | None = None) -> float:
    """A (mla): Megatron's MLA projections + causal core + output, per token.

    ``keys_per_query`` replaces the causal core's average of s/2 keys (DSA attends top-k).
    """
    mla, h, nq = model.attention.mla, model.hidden_size, model.num_attention_heads
    s = model.seq_length if seq_length is None else seq_length
    dqk, dr, dv = mla.qk_head_dim, mla.qk_pos_emb_head_dim, mla.v_head_dim
    qr, kvr = mla.q_lora_rank, mla.kv_lora_rank
    q = 2.0 * h * nq * (dqk + dr) if qr is None else 2.0 * (h * qr + qr * nq * (dqk + dr))
    kv = 2.0 * h * (kvr + dr) + 2.0 * kvr * nq * (dqk + dv)
    keys = s / 2 if keys_per_query is None else keys_per_query
    core = 2.0 * keys * nq * (dqk + dr) + 2.0 * keys * nq * dv
    return q + kv + core + 2.0 * nq * dv * h


def dsa_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """A (dsa): MLA with each query attending its top-k keys, plus the indexer, per token.

    Indexer (Megatron's DSAIndexer): q from the query latent (or hidden without one)
    2*r*ih*id, k 2*h*id, head weights 2*h*ih, causal scores over s/2 keys 2*(s/2)*ih*id.
    Core: a query at position t attends min(top_k, t) keys; averaged over t = 1..s that
    is s/2 when top_k >= s, else top_k - top_k^2 / (2 s).
    """
    dsa, h = model.attention.dsa, model.hidden_size
    s = model.seq_length if seq_length is None else seq_length
    k = dsa.top_k
    keys = s / 2 if k >= s else k - k * k / (2 * s)
    r = model.attention.mla.q_lora_rank or h
    ih, idim = dsa.indexer_heads, dsa.indexer_head_dim
    indexer = 2.0 * r * ih * idim + 2.0 * h * idim + 2.0 * h * ih + 2.0 * (s / 2) * ih * idim
    return mla_flops(model, seq_length, keys_per_query=keys) + indexer


#: attention variant -> forward FLOPs per token of an A layer of that variant.
VARIANT_FLOPS: dict[str, Callable[[ModelConfig, int | None], float]] = {
    "gqa": attention_flops,
    "mla": mla_flops,
    "dsa": dsa_flops,
}


def mlp_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """F: forward FLOPs per token of the dense MLP (swiglu 3 matrices, else 2)."""
    return _mlp(model.hidden_size, model.ffn_hidden_size, model.activation)


def moe_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """E: router + top_k routed experts + the shared expert (if any), per token."""
    moe, h = model.moe, model.hidden_size
    router = 2.0 * h * moe.num_experts
    routed = moe.top_k * _mlp(h, moe.ffn_hidden_size, model.activation)
    shared = (
        _mlp(h, moe.shared_expert_ffn_hidden_size, model.activation)
        if moe.shared_expert_ffn_hidden_size
        else 0.0
    )
    return router + routed + shared


def mamba_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """M: Mamba-2 in_proj + depthwise conv + recurrence (6*d_inner*N) + out_proj, per token;
    Mamba-3 (SISO) has no conv, three per-head rows (dt, A, trap) and the rotary angles in
    in_proj, and two state updates per step (trapezoidal rule: 8*d_inner*N)."""
    m, h = model.mamba, model.hidden_size
    nheads = model.mamba_heads
    d_inner = nheads * m.head_dim
    bc = 2 * m.num_groups * m.state_dim
    if m.variant == "mamba3":
        angles = int(m.state_dim * m.rope_fraction) // 2
        in_proj = 2.0 * h * (2 * d_inner + bc + 3 * nheads + angles)
        scan = 3 * 2.0 * d_inner * m.state_dim + 2.0 * d_inner * m.state_dim
        return in_proj + scan + 2.0 * d_inner * h
    in_proj = 2.0 * h * (2 * d_inner + bc + nheads)
    conv = 2.0 * m.conv_kernel * (d_inner + bc)
    scan = 2.0 * 2.0 * d_inner * m.state_dim + 2.0 * d_inner * m.state_dim
    out_proj = 2.0 * d_inner * h
    return in_proj + conv + scan + out_proj


def recurrent_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """R: M2RNN in_proj + conv + matrix-state recurrence + out_proj, per token."""
    r, h = model.recurrent, model.hidden_size
    H, K, V = r.heads(h), r.k_head_dim, r.v_head_dim
    QK = K if r.qk_heads == "shared" else H * K  # q and k widths: shared, or per head
    in_proj = 2.0 * h * (2 * QK + 2 * H * V + H)
    conv = 2.0 * r.conv_kernel * (2 * QK + H * V)
    state_matmul = 2.0 * K * V * V  # h @ W
    outer = 1.0 * K * V  # k (x) v
    blend = 3.0 * K * V  # f * h + (1 - f) * h_new
    readout = 2.0 * K * V  # q . h
    recurrence = H * (state_matmul + outer + blend + readout)
    out_proj = 2.0 * H * V * h
    return in_proj + conv + recurrence + out_proj


def gdn_flops(model: ModelConfig, seq_length: int | None = None) -> float:
    """G: Gated DeltaNet in_proj + conv + delta rule (8*Hv*Dk*Dv) + out_proj, per token."""
    g, h = model.gdn, model.hidden_size
    qk_dim = g.num_key_heads * g.key_head_dim
    v_dim = g.num_value_heads * g.value_head_dim
    in_proj = 2.0 * h * (2 * qk_dim + 2 * v_dim + 2 * g.num_value_heads)
    conv = 2.0 * g.conv_kernel * (2 * qk_dim + v_dim)
    delta_rule = 4 * 2.0 * g.num_value_heads * g.key_head_dim * g.value_head_dim
    out_proj = 2.0 * v_dim * h
    return in_proj + conv + delta_rule + out_proj


#: letter -> forward FLOPs per token of one layer of that family.
FAMILY_FLOPS: dict[str, Callable[[ModelConfig, int | None], float]] = {
    "A": attention_flops,
    "E": moe_flops,
    "M": mamba_flops,
    "F": mlp_flops,
    "R": recurrent_flops,
    "G": gdn_flops,
}
assert set(FAMILY_FLOPS) == set(FAMILIES)


def layer_flops(letter: str, model: ModelConfig, seq_length: int | None = None) -> float:
    """Forward FLOPs per token of one layer with block letter ``letter``."""
    return FAMILY_FLOPS[letter](model, seq_length)


def output_layer_flops(model: ModelConfig, vocab_size: int | None = None) -> float:
    """Forward FLOPs per token of the logits: ``2 * h * vocab``."""
    return 2.0 * model.hidden_size * (model.vocab_size if vocab_size is None else vocab_size)


def mtp_projection_flops(model: ModelConfig) -> float:
    """Forward FLOPs per token of one MTP depth's projection of [embedding, hidden]: 2*(2h)*h."""
    return 2.0 * (2 * model.hidden_size) * model.hidden_size


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token, split by where they are spent.

    ``per_letter`` sums the main decoder's layers by letter; ``mtp`` is every MTP depth
    (its layers, projection and output layer); ``output`` the main output layer;
    ``embedding`` the n-gram features' projection (table lookups count no FLOPs), for the
    main embedding and again for each MTP depth, which embeds its shifted tokens anew.
    """

    per_letter: dict[str, float]
    output: float
    mtp: float
    embedding: float = 0.0

    @property
    def forward(self) -> float:
        return sum(self.per_letter.values()) + self.output + self.mtp + self.embedding

    @property
    def training(self) -> float:
        return TRAINING_MULTIPLIER * self.forward


def flops_breakdown(
    layout: Layout | ModelPlan,
    model: ModelConfig,
    *,
    seq_length: int | None = None,
    vocab_size: int | None = None,
) -> FlopsBreakdown:
    """Forward FLOPs per token of a model built with ``model``, by family.

    ``layout`` is the per-layer plan (:mod:`megacpp_mcore.plan`), or a layout, which is
    resolved into one with ``model``: every layer is counted as the variant the plan builds.
    ``seq_length`` defaults to ``model.seq_length``; ``vocab_size`` to ``model.vocab_size``
    (pass Megatron's padded vocabulary to count the logits it really computes).
    """
    plan = layout if isinstance(layout, ModelPlan) else plan_layers(layout, model)

    def flops(layer) -> float:
        if layer.letter == "A":
            return VARIANT_FLOPS[layer.variant](model, seq_length)
        return layer_flops(layer.letter, model, seq_length)

    per_letter = {letter: 0.0 for letter, n in plan.layout.counts.items() if n}
    if plan.layout.has("A"):
        per_letter.setdefault("A", 0.0)
    for layer in plan.layers:
        per_letter[layer.letter] += flops(layer)
    output = output_layer_flops(model, vocab_size)
    mtp = sum(flops(layer) for layer in plan.mtp_layers)
    mtp += plan.layout.mtp_depth * (mtp_projection_flops(model) + output)
    ngram = model.ngram_hash
    embedding = (2.0 * len(ngram.orders) * ngram.tables_per_order * ngram.embed_dim
                 * model.hidden_size * (1 + plan.layout.mtp_depth) if ngram.enabled else 0.0)
    return FlopsBreakdown(per_letter=per_letter, output=output, mtp=mtp, embedding=embedding)


def model_flops_per_token(
    layout: Layout | ModelPlan,
    model: ModelConfig,
    *,
    seq_length: int | None = None,
    vocab_size: int | None = None,
) -> float:
    """Training (3 x forward) model FLOPs per token, output layer(s) and MTP included."""
    return flops_breakdown(layout, model, seq_length=seq_length, vocab_size=vocab_size).training


def tflops_per_gpu(flops_per_token: float, tokens_per_s: float, num_gpus: int = 1) -> float:
    """Achieved model TFLOP/s per GPU from a run's global throughput (tokens/s)."""
    if num_gpus <= 0:
        raise ValueError(f"num_gpus must be positive, got {num_gpus}")
    return flops_per_token * tokens_per_s / num_gpus / 1e12


def peak_tflops(gpu_name: str | None, override: float | None = None) -> float | None:
    """Dense BF16 peak TFLOP/s of a GPU by name (``override`` wins); None when unknown."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override}")
        return float(override)
    if not gpu_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if re.search(re.escape(key).replace(r"\ ", r"[\s_-]*"), gpu_name, re.IGNORECASE):
            return value
    return None


def mfu(tflops_per_gpu: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak (a fraction); None without a peak."""
    if peak_tflops is None:
        return None
    if peak_tflops <= 0:
        raise ValueError(f"peak TFLOP/s must be positive, got {peak_tflops}")
    return tflops_per_gpu / peak_tflops

"""Typed settings: the vocabulary shared by recipes, the spec builder and the translator.

Every section is a frozen dataclass; each field is documented once, here, in the class
docstring's ``Attributes`` list (recipes and ``megacpp recipe describe`` read it from
there). Pure Python: nothing here imports torch or Megatron. Cross-field rules that need
the layout or the parallel sizes live in ``recipe.py`` (for recipes) and ``model.py`` (for
what the model builder itself must refuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward (letter E).

    Attributes:
        num_experts: routed experts per MoE layer.
        top_k: experts each token is routed to.
        ffn_hidden_size: hidden size of one routed expert's MLP.
        shared_expert_ffn_hidden_size: hidden size of the always-on shared expert; null for
            none.
        router_load_balancing: load-balancing loss: aux_loss (switch-style, per micro-batch),
            seq_aux_loss (per sequence), or none.
        aux_loss_coeff: weight of the load-balancing loss.
        router_score_function: softmax or sigmoid gate scores.
        grouped_gemm: run the experts as one grouped GEMM (GPU); false runs them one by one.
        token_dispatcher: alltoall (expert parallel, GPU) or allgather.
    """

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 1024
    shared_expert_ffn_hidden_size: int | None = None
    router_load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 1e-2
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    grouped_gemm: bool = True
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"


@dataclass(frozen=True)
class MambaConfig:
    """Mamba-2 mixer (letter M).

    Attributes:
        state_dim: SSM state size N per group.
        head_dim: channels per SSM head P.
        num_groups: B/C groups (split across tensor-parallel ranks).
        num_heads: SSM heads; null means 2 * hidden_size / head_dim (expand 2).
        conv_kernel: width of the depthwise causal convolution.
        chunk_size: chunk length of the chunked SSD scan (fused and reference).
    """

    state_dim: int = 128
    head_dim: int = 64
    num_groups: int = 8
    num_heads: int | None = None
    conv_kernel: int = 4
    chunk_size: int = 128


@dataclass(frozen=True)
class RecurrentConfig:
    """Recurrent mixer (letter R): an M2RNN-style matrix-state RNN.

    Per head the state is a k_head_dim x v_head_dim matrix h, updated as
    ``h = f * h + (1 - f) * tanh(h @ W + k (x) v)`` and read out as ``y = q . h``.

    Attributes:
        num_heads: recurrent heads (split across tensor-parallel ranks).
        k_head_dim: rows of each head's state (size of q and k).
        v_head_dim: columns of each head's state (size of v, the gate and the output).
        conv_kernel: width of the depthwise causal convolution on q, k, v.
        backward_chunk: time steps between stored states in the fused kernel's backward
            (recomputed inside a chunk), so activation memory stays linear in sequence length.
    """

    num_heads: int = 16
    k_head_dim: int = 64
    v_head_dim: int = 16
    conv_kernel: int = 4
    backward_chunk: int = 64


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Megatron's Gated DeltaNet mixer (letter G; needs flash-linear-attention).

    Attributes:
        num_key_heads: query/key heads.
        num_value_heads: value heads (a multiple of num_key_heads).
        key_head_dim: channels per query/key head.
        value_head_dim: channels per value head.
        conv_kernel: width of the short causal convolution.
    """

    num_key_heads: int = 16
    num_value_heads: int = 32
    key_head_dim: int = 128
    value_head_dim: int = 128
    conv_kernel: int = 4


@dataclass(frozen=True)
class ModelConfig:
    """Model shape shared by every block family, plus one nested section per mixer family.

    Attributes:
        hidden_size: width of the residual stream.
        ffn_hidden_size: hidden size of the dense MLP (letter F).
        num_attention_heads: query heads of attention layers (letter A).
        num_query_groups: key/value heads (grouped-query attention); null means one per query
            head.
        kv_channels: channels per attention head; null means hidden_size / num_attention_heads.
        vocab_size: tokenizer vocabulary (Megatron pads it for tensor parallelism).
        seq_length: training sequence length (also the maximum position).
        position_embedding: rope or none.
        rotary_base: RoPE base period.
        activation: MLP activation: swiglu (gated SiLU), squared_relu or gelu.
        normalization: RMSNorm or LayerNorm.
        norm_epsilon: epsilon of every norm.
        init_std: standard deviation of the normal weight initialisation.
        tie_embeddings: share the input embedding and the output layer.
        hidden_dropout: dropout on the residual branches.
        attention_dropout: dropout on attention probabilities.
        moe: the MoE section (letter E).
        mamba: the Mamba-2 section (letter M).
        recurrent: the recurrent mixer section (letter R).
        gdn: the Gated DeltaNet section (letter G).
    """

    hidden_size: int = 256
    ffn_hidden_size: int = 1024
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    kv_channels: int | None = None
    vocab_size: int = 512
    seq_length: int = 256
    position_embedding: Literal["rope", "none"] = "rope"
    rotary_base: int = 10000
    activation: Literal["swiglu", "squared_relu", "gelu"] = "swiglu"
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    gdn: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def mamba_heads(self) -> int:
        return self.mamba.num_heads or 2 * self.hidden_size // self.mamba.head_dim


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric precision.

    Attributes:
        params_dtype: dtype of parameters and activations: bf16, fp16 or fp32 (Megatron keeps
            fp32 main weights in the optimizer for bf16/fp16).
        grad_reduce_in_fp32: reduce gradients across data-parallel ranks in fp32.
    """

    params_dtype: DType = "bf16"
    grad_reduce_in_fp32: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel sizes and sharding.

    Attributes:
        tensor: tensor-parallel size (splits heads, experts' and MLP hidden dims).
        pipeline: pipeline-parallel size; with '|' in the pattern it must equal the stages.
        expert: expert-parallel size (splits the experts of each MoE layer).
        context: context-parallel size (splits the sequence).
        sequence_parallel: shard activations along the sequence inside tensor-parallel regions
            (needs tensor > 1).
        distributed_optimizer: shard optimizer state across data-parallel ranks.
        fsdp: none, torch_fsdp2 or megatron_fsdp.
    """

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    fsdp: Literal["none", "torch_fsdp2", "megatron_fsdp"] = "none"


@dataclass(frozen=True)
class TrainingConfig:
    """Training schedule and optimizer.

    Attributes:
        micro_batch_size: sequences per micro-batch per data-parallel rank.
        global_batch_size: sequences per optimizer step across all ranks.
        train_iters: optimizer steps.
        lr: peak learning rate.
        min_lr: final learning rate of the decay.
        lr_warmup_iters: linear warm-up steps.
        lr_decay_style: constant, linear or cosine.
        weight_decay: decoupled weight decay.
        adam_beta1: Adam beta1.
        adam_beta2: Adam beta2.
        clip_grad: global gradient-norm clip (0 disables).
        seed: random seed.
        log_interval: steps between log lines and receipt updates.
        save_interval: steps between checkpoints (null: only at the end when saving).
        eval_interval: steps between validation runs (null: no validation).
        eval_iters: validation batches per run.
    """

    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 10
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    save_interval: int | None = None
    eval_interval: int | None = None
    eval_iters: int = 10


@dataclass(frozen=True)
class DataConfig:
    """Training data.

    Attributes:
        source: embedded (the project's own text, byte-tokenized), mock (Megatron's mock
            data) or path (Megatron indexed datasets named in paths).
        paths: indexed dataset prefixes (without .bin/.idx) when source is path.
        split: train/valid/test split of the documents, as Megatron's --split.
        tokenizer: byte (vocabulary 256 + specials) for embedded/path data, or null for mock.
    """

    source: Literal["embedded", "mock", "path"] = "embedded"
    paths: tuple[str, ...] = ()
    split: str = "98,2,0"
    tokenizer: Literal["byte"] | None = "byte"


@dataclass(frozen=True)
class LoggingConfig:
    """Logs and receipts.

    Attributes:
        receipt_dir: folder for run receipts (JSON), one file per run.
        tensorboard_dir: Megatron's TensorBoard folder; null for none.
    """

    receipt_dir: str = "runs"
    tensorboard_dir: str | None = None


@dataclass(frozen=True)
class FireConfig:
    """FIRE: re-initialise weight matrices to their nearest isometry at chosen steps.

    Attributes:
        steps: optimizer steps (1-based) before which FIRE runs; empty turns FIRE off.
        mode: which parts: all (every declared matrix part), attention (the A layers' query,
            key, value and output) or context_extension (only the A layers' query and key).
        method: exact (polar factor by SVD: singular values equal sqrt(d_out/d_in)) or paper
            (Frobenius-normalise, then 5 cubic Newton-Schulz steps, as the reference code).
        rewarmup_iters: after each FIRE step, ramp the learning rate linearly back up over
            this many steps; 0 turns the re-warm-up off.
    """

    steps: tuple[int, ...] = ()
    mode: Literal["all", "attention", "context_extension"] = "all"
    method: Literal["exact", "paper"] = "exact"
    rewarmup_iters: int = 0


@dataclass(frozen=True)
class DashConfig:
    """DASH: shrink weight rows whose gradient EMA points along the row.

    Attributes:
        every: steps between DASH steps; null turns DASH off.
        start: first DASH step.
        lam: smallest row scale (the paper's lambda).
        alpha: weight of the newest gradient in the gradient EMA.
    """

    every: int | None = None
    start: int = 1
    lam: float = 0.3
    alpha: float = 0.3


@dataclass(frozen=True)
class RedoConfig:
    """ReDo: recycle dormant hidden units of the F and E (per expert) MLPs.

    Attributes:
        every: steps between ReDo checks; null turns ReDo off.
        start: first ReDo check.
        tau: a unit is dormant when its activity divided by its layer's mean is <= tau.
        beta: weight of the newest step in the activity EMA.
    """

    every: int | None = None
    start: int = 1
    tau: float = 0.025
    beta: float = 0.1


@dataclass(frozen=True)
class PlasticityConfig:
    """Plasticity tools, each on its own cadence (they need the plugin, not native Megatron).

    Attributes:
        fire: the FIRE section.
        dash: the DASH section.
        redo: the ReDo section.
    """

    fire: FireConfig = field(default_factory=FireConfig)
    dash: DashConfig = field(default_factory=DashConfig)
    redo: RedoConfig = field(default_factory=RedoConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.fire.steps) or self.dash.every is not None or (
            self.redo.every is not None)

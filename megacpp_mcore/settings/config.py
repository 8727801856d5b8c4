"""Typed settings: the vocabulary shared by recipes, the spec builder and the translator.

Every section is a frozen dataclass; each field is documented once, here, in the class
docstring's ``Attributes`` list (recipes and ``megacpp recipe describe`` read it from
there). Every construction (a YAML recipe, Python code, settings read back from Megatron's
args) is checked in ``__post_init__``: exact types (``true`` is not an integer, literals
take only their listed values) and the single-value rules of the settings table
(:mod:`megacpp_mcore.settings.table`), raising :class:`RecipeError` that names the key path
and what is accepted. Pure Python: nothing here imports torch or Megatron. Cross-field rules
that need the layout or the parallel sizes live in ``sizes.py`` and ``recipe.py``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.settings.table import value_problem

DType = Literal["fp32", "bf16", "fp16"]


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepted(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_accepted(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a tuple of {_accepted(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of the settings dataclass ``obj`` (its key paths under ``prefix``).

    Lists become tuples and integers become floats where the field is a float, so equal
    settings compare equal however they were written.
    """
    for f in dataclasses.fields(obj):
        if not f.metadata.get("key", True):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(obj, f.name, value)
        if not _fits(value, tp):
            raise RecipeError(f"{key}: got {value!r} ({type(value).__name__}); accepted: "
                              f"{_accepted(tp)}")
        if isinstance(value, int) and not isinstance(value, bool) and _fits(1.5, tp):
            value = float(value)
            object.__setattr__(obj, f.name, value)
        problem = value_problem(key, value)
        if problem:
            raise RecipeError(f"{key}: {problem}")


class _Checked:
    """Mixin: check the fields on construction (``PREFIX`` is the section's key path)."""

    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self.PREFIX)


@dataclass(frozen=True)
class MoEConfig(_Checked):
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
        token_dispatcher: alltoall (expert parallel, GPU), allgather, or flex (DeepEP's
            fused dispatch; needs the deep_ep package, CUDA and tensor x expert parallel > 1).
        router_dtype: dtype of the router's scores and probabilities: fp32, fp64, or null
            for the parameters' dtype.
        permute_fusion: fuse the token permutation kernels (Megatron's --moe-permute-fusion;
            needs Transformer Engine).
        expert_gemm: the kernel of the grouped experts (backend te, grouped_gemm): te
            (Transformer Engine's GroupedLinear, one cuBLAS GEMM per expert, as stock
            Megatron) or torch (one torch grouped GEMM per projection, group boundaries on
            the GPU: no host work per new token split; bf16, Hopper+). Same parameters and
            checkpoints; layers/grouped_experts.py.
    """

    PREFIX: ClassVar[str] = "model.moe"

    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 1024
    shared_expert_ffn_hidden_size: int | None = None
    router_load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 1e-2
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    grouped_gemm: bool = True
    token_dispatcher: Literal["alltoall", "allgather", "flex"] = "alltoall"
    router_dtype: Literal["fp32", "fp64"] | None = None
    permute_fusion: bool = False
    expert_gemm: Literal["te", "torch"] = "te"


@dataclass(frozen=True)
class MLAConfig(_Checked):
    """Multi-latent attention (Megatron's MLA), used by A positions whose variant is mla or dsa.

    Attributes:
        q_lora_rank: rank of the query's low-rank (down/up) projection; null projects queries
            directly (no compression).
        kv_lora_rank: rank of the shared key/value latent.
        qk_head_dim: per-head query/key channels without position embedding.
        qk_pos_emb_head_dim: per-head query/key channels that carry RoPE.
        v_head_dim: per-head value channels.
        rope_type: rope or yarn (Megatron's MLA default when no --rope-type is passed).
    """

    PREFIX: ClassVar[str] = "model.attention.mla"

    q_lora_rank: int | None = 64
    kv_lora_rank: int = 64
    qk_head_dim: int = 64
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 64
    rope_type: Literal["rope", "yarn"] = "rope"


@dataclass(frozen=True)
class DSAConfig(_Checked):
    """DeepSeek sparse attention (Megatron's DSA: MLA plus a top-k token indexer).

    Attributes:
        indexer_heads: heads of the lightweight indexer that scores past tokens.
        indexer_head_dim: channels per indexer head.
        top_k: past tokens each query attends to.
        indexer_loss_coeff: weight of the indexer's KL loss against dense attention. 0 turns
            it off, and then nothing trains the indexer: Megatron detaches its inputs, so its
            weights get no gradient and keep their initialisation.
        rotate_activation: Hadamard-rotate the indexer's q and k before scoring (Megatron's
            default; needs fast_hadamard_transform on the machine).
    """

    PREFIX: ClassVar[str] = "model.attention.dsa"

    indexer_heads: int = 8
    indexer_head_dim: int = 64
    top_k: int = 256
    indexer_loss_coeff: float = 0.001
    rotate_activation: bool = True


AttentionVariant = Literal["gqa", "mla", "dsa"]


@dataclass(frozen=True)
class AttentionConfig(_Checked):
    """Which attention each A position gets (the letter stays A; the variant is a setting).

    A rank is the 0-based index of an A among the main decoder's A layers (the seed's
    NAM56R: MLA at A ranks 0, 4, 8, 12 = layers 1, 17, 33, 49); a layer is its 1-based
    number. Positions not listed get ``variant``. Megatron refuses gqa mixed with mla/dsa
    in one model.

    Attributes:
        variant: the variant of every A position not listed below: gqa (Megatron's
            SelfAttention, grouped-query), mla or dsa.
        mla_ranks: A ranks (0-based, main decoder) that get MLA.
        dsa_ranks: A ranks (0-based, main decoder) that get DSA.
        mla_layers: layer numbers (1-based, main decoder) that get MLA; each must be an A.
        dsa_layers: layer numbers (1-based, main decoder) that get DSA; each must be an A.
        mtp_variant: the variant of A layers in multi-token-prediction parts (all parts are
            identical); null means variant.
        mla: the MLA sizes (used by mla and dsa positions).
        dsa: the DSA indexer settings (used by dsa positions).
    """

    PREFIX: ClassVar[str] = "model.attention"

    variant: AttentionVariant = "gqa"
    mla_ranks: tuple[int, ...] = ()
    dsa_ranks: tuple[int, ...] = ()
    mla_layers: tuple[int, ...] = ()
    dsa_layers: tuple[int, ...] = ()
    mtp_variant: AttentionVariant | None = None
    mla: MLAConfig = field(default_factory=MLAConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)


@dataclass(frozen=True)
class MambaConfig(_Checked):
    """Mamba mixer (letter M): Mamba-2, or Mamba-3.

    Attributes:
        variant: mamba2 (Megatron's MambaMixer on GPU) or mamba3 (mamba-ssm's Mamba-3 SISO
            scan: trapezoidal rule, data-dependent rotary angles, no convolution).
        state_dim: SSM state size N per group.
        head_dim: channels per SSM head P.
        num_groups: B/C groups (split across tensor-parallel ranks).
        num_heads: SSM heads; null means 2 * hidden_size / head_dim (expand 2).
        conv_kernel: width of the depthwise causal convolution (Mamba-2 only).
        chunk_size: chunk length of the chunked scan (fused and reference).
        rope_fraction: Mamba-3: share of the state's channels rotated by the data-dependent
            angles (0.5 or 1.0).
        mimo: Mamba-3: multi-input multi-output form (mamba-ssm's TileLang kernels).
        mimo_rank: Mamba-3 MIMO rank (inputs/outputs per head).
    """

    PREFIX: ClassVar[str] = "model.mamba"

    variant: Literal["mamba2", "mamba3"] = "mamba2"
    state_dim: int = 128
    head_dim: int = 64
    num_groups: int = 8
    num_heads: int | None = None
    conv_kernel: int = 4
    chunk_size: int = 128
    rope_fraction: float = 0.5
    mimo: bool = False
    mimo_rank: int = 4


@dataclass(frozen=True)
class RecurrentConfig(_Checked):
    """Recurrent mixer (letter R): an M2RNN-style matrix-state RNN.

    Per head the state is a k_head_dim x v_head_dim matrix h, updated as
    ``h = f * h + (1 - f) * tanh(h @ W + k (x) v)`` and read out as ``y = q . h``. The
    defaults are this project's per-head layer; the seed system's layer (recipes/nam56r.yaml)
    is qk_heads shared, num_heads null, in_proj_order qkvfg, skip_scale per_channel, norm
    whole, proj_init linear_default, forget_bf16 true.

    Attributes:
        num_heads: recurrent (value, forget, gate, W) heads, split across tensor-parallel
            ranks; null means hidden_size // (k_head_dim + v_head_dim), the seed's rule
            (51 at hidden 4096, K 64, V 16).
        k_head_dim: rows of each head's state (size of q and k).
        v_head_dim: columns of each head's state (size of v, the gate and the output).
        conv_kernel: width of the depthwise causal convolution on q, k, v.
        backward_chunk: time steps between stored states in the fused kernel's backward
            (recomputed inside a chunk), so activation memory stays linear in sequence length.
        qk_heads: per_head (one q and one k head per head) or shared (ONE q head and ONE k
            head read by every head, the seed's layer; the scan broadcasts them, no copies).
        in_proj_order: order of the parts of the fused input projection: qkvgf (q|k|v|g|f,
            this project's) or qkvfg (q|k|v|f|g, the seed's).
        skip_scale: the D skip ``y + D * v``: per_head (one scalar per head) or per_channel
            (a [heads, V] matrix, the seed's).
        norm: the RMS norm before out_proj: per_head (over each head's V channels) or whole
            (one norm over all heads' concatenated output, the seed's).
        proj_init: normal (Megatron's normal init with init_std; out_proj scaled by depth)
            or linear_default (torch nn.Linear's default kaiming-uniform, the seed's).
        forget_bf16: round the forget gate to bfloat16 before the scan (the seed's).
    """

    PREFIX: ClassVar[str] = "model.recurrent"

    num_heads: int | None = 16
    k_head_dim: int = 64
    v_head_dim: int = 16
    conv_kernel: int = 4
    backward_chunk: int = 64
    qk_heads: Literal["per_head", "shared"] = "per_head"
    in_proj_order: Literal["qkvgf", "qkvfg"] = "qkvgf"
    skip_scale: Literal["per_head", "per_channel"] = "per_head"
    norm: Literal["per_head", "whole"] = "per_head"
    proj_init: Literal["normal", "linear_default"] = "normal"
    forget_bf16: bool = False

    def form(self) -> str:
        """The layer form in words, for the backend record (what differs from per-head)."""
        parts = [f"{self.qk_heads} q/k", f"in_proj {'|'.join(self.in_proj_order)}",
                 f"D {self.skip_scale}", f"norm {self.norm}", f"{self.proj_init} init"]
        if self.forget_bf16:
            parts.append("forget gate in bf16")
        if self.qk_heads == "shared" or self.norm == "whole":
            parts.append("tensor parallel 1 only (refused above, not replicated)")
        return ", ".join(parts)

    def heads(self, hidden_size: int) -> int:
        """The number of heads for a model of width ``hidden_size``."""
        if self.num_heads is not None:
            return self.num_heads
        return hidden_size // (self.k_head_dim + self.v_head_dim)


@dataclass(frozen=True)
class GatedDeltaNetConfig(_Checked):
    """Megatron's Gated DeltaNet mixer (letter G; needs flash-linear-attention).

    Attributes:
        num_key_heads: query/key heads.
        num_value_heads: value heads (a multiple of num_key_heads).
        key_head_dim: channels per query/key head.
        value_head_dim: channels per value head.
        conv_kernel: width of the short causal convolution.
    """

    PREFIX: ClassVar[str] = "model.gdn"

    num_key_heads: int = 16
    num_value_heads: int = 32
    key_head_dim: int = 128
    value_head_dim: int = 128
    conv_kernel: int = 4


@dataclass(frozen=True)
class NgramHashConfig(_Checked):
    """Hashed token n-gram features added to the token embeddings (the seed system's n-gram
    hash embedding: an input enrichment, off by default; needs the plugin).

    Attributes:
        enabled: add the features to every token embedding (and to the MTP depths', which
            share the embedding).
        orders: n-gram orders hashed (2: a token and the one before it; 3: two before it).
        tables_per_order: hash tables per order, each with its own hash function.
        table_size: rows per table (each table takes a distinct prime at or above it).
        embed_dim: width of a table row; the rows of all tables are concatenated and
            projected to hidden_size by a zero-initialised linear, so a model starts out as
            it would without the features.
        hash_seed: seed of the hash functions and the tables' initialisation; a checkpoint's
            tables only mean something under the same hashes, so it is fixed per recipe.
    """

    PREFIX: ClassVar[str] = "model.ngram_hash"

    enabled: bool = False
    orders: tuple[int, ...] = (2, 3)
    tables_per_order: int = 8
    table_size: int = 500_000
    embed_dim: int = 16
    hash_seed: int = 1234

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled and not self.orders:
            raise RecipeError("model.ngram_hash.orders is empty; give the n-gram orders to "
                              "hash (e.g. [2, 3]) or set model.ngram_hash.enabled false")


@dataclass(frozen=True)
class ModelConfig(_Checked):
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
        attention: the attention variant of each A position (gqa, mla, dsa) and their sizes.
        moe: the MoE section (letter E).
        mamba: the Mamba section (letter M: Mamba-2 or Mamba-3).
        recurrent: the recurrent mixer section (letter R).
        gdn: the Gated DeltaNet section (letter G).
        ngram_hash: hashed n-gram features added to the token embeddings.
    """

    PREFIX: ClassVar[str] = "model"

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
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    gdn: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    ngram_hash: NgramHashConfig = field(default_factory=NgramHashConfig)

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
class PrecisionConfig(_Checked):
    """Numeric precision.

    Attributes:
        params_dtype: dtype of parameters and activations: bf16, fp16 or fp32 (Megatron keeps
            fp32 main weights in the optimizer for bf16/fp16).
        grad_reduce_in_fp32: reduce gradients across data-parallel ranks in fp32.
    """

    PREFIX: ClassVar[str] = "precision"

    params_dtype: DType = "bf16"
    grad_reduce_in_fp32: bool = True


@dataclass(frozen=True)
class ParallelConfig(_Checked):
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

    PREFIX: ClassVar[str] = "parallel"

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    fsdp: Literal["none", "torch_fsdp2", "megatron_fsdp"] = "none"


@dataclass(frozen=True)
class TrainingConfig(_Checked):
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

    PREFIX: ClassVar[str] = "training"

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
class DataConfig(_Checked):
    """Training data.

    Attributes:
        source: embedded (the project's own text, byte-tokenized), mock (Megatron's mock
            data) or path (Megatron indexed datasets named in paths).
        paths: indexed dataset prefixes (without .bin/.idx) when source is path.
        split: train/valid/test split of the documents, as Megatron's --split.
        tokenizer: byte (vocabulary 256 + specials) for embedded/path data, or null for mock.
    """

    PREFIX: ClassVar[str] = "data"

    source: Literal["embedded", "mock", "path"] = "embedded"
    paths: tuple[str, ...] = ()
    split: str = "98,2,0"
    tokenizer: Literal["byte"] | None = "byte"


@dataclass(frozen=True)
class LoggingConfig(_Checked):
    """Logs and receipts.

    Attributes:
        receipt_dir: folder for run receipts (JSON), one file per run.
        tensorboard_dir: Megatron's TensorBoard folder; null for none.
    """

    PREFIX: ClassVar[str] = "logging"

    receipt_dir: str = "runs"
    tensorboard_dir: str | None = None


@dataclass(frozen=True)
class StpConfig(_Checked):
    """STP, the trajectory-straightness auxiliary loss (arXiv 2602.22617), on decoder layers.

    Attributes:
        enabled: add the STP loss (needs the plugin: --target native refuses it).
        weight: the loss weight lambda (total loss = LM loss + weight * STP); the paper uses 0.1.
        start_step: first iteration (1-based) whose gradient includes STP; before it the loss
            is computed without gradient, for logging only.
        ramp_steps: iterations over which the weight rises linearly from weight / ramp_steps
            to weight, starting at start_step (0: no ramp).
        triples: samples (triples or spans) drawn per sequence and micro-batch.
        min_gap: minimum distance in positions between consecutive sampled points.
        layers: decoder layer numbers (1-based) whose outputs are straightened; empty means
            the last decoder layer (multi-token-prediction layers are never used).
        form: triple (1 - cos(h[t] - h[r], h[r] - h[s]) for s < r < t, the paper's form) or
            span (a random span's displacement against the rest of its document, the
            released code's random_span form).
    """

    PREFIX: ClassVar[str] = "stp"

    enabled: bool = False
    weight: float = 0.1
    start_step: int = 1
    ramp_steps: int = 0
    triples: int = 64
    min_gap: int = 1
    layers: tuple[int, ...] = ()
    form: Literal["triple", "span"] = "triple"


#: phase boundaries ``plasticity.fire.steps`` may name instead of a step number
FirePhase = Literal["warmup_end", "stp_start", "seq_length_change"]
FIRE_PHASES: tuple[str, ...] = typing.get_args(FirePhase)
#: the boundary known only at launch: the first step after loading a checkpoint trained at
#: another sequence length
SEQ_LENGTH_CHANGE = "seq_length_change"


@dataclass(frozen=True)
class FireConfig(_Checked):
    """FIRE: re-initialise weight matrices to their nearest isometry at chosen steps.

    Attributes:
        steps: optimizer steps (1-based) before which FIRE runs, or named phase boundaries:
            warmup_end (the first step after the learning-rate warm-up), stp_start (the
            step the STP loss starts), seq_length_change (the first step after loading a
            checkpoint trained at another sequence length, as when context extension
            continues a run with a longer --seq-length; a resume at the same length is no
            boundary; Megatron launcher only); empty turns FIRE off.
        mode: which parts: all (every declared matrix part), attention (the A layers' query,
            key, value and output) or context_extension (only the A layers' query and key).
        method: exact (polar factor by SVD: singular values equal sqrt(d_out/d_in)) or paper
            (Frobenius-normalise, then 5 cubic Newton-Schulz steps, as the reference code).
        rewarmup_iters: after each FIRE step, ramp the learning rate linearly back up over
            this many steps; 0 turns the re-warm-up off.
    """

    PREFIX: ClassVar[str] = "plasticity.fire"

    steps: tuple[int | FirePhase, ...] = ()
    mode: Literal["all", "attention", "context_extension"] = "all"
    method: Literal["exact", "paper"] = "exact"
    rewarmup_iters: int = 0


def fire_phase_steps(lr_warmup_iters: int, stp: Any) -> dict[str, int | None]:
    """The step each named phase boundary of ``plasticity.fire.steps`` stands for in this
    recipe (None: the recipe has no such boundary). ``seq_length_change`` is known only at
    launch."""
    return {"warmup_end": lr_warmup_iters + 1 if lr_warmup_iters else None,
            "stp_start": stp.start_step if stp.enabled else None, SEQ_LENGTH_CHANGE: None}


@dataclass(frozen=True)
class DashConfig(_Checked):
    """DASH: shrink weight rows whose gradient EMA points along the row.

    Attributes:
        every: steps between DASH steps; null turns DASH off.
        start: first DASH step.
        lam: smallest row scale (the paper's lambda).
        alpha: weight of the newest gradient in the gradient EMA.
    """

    PREFIX: ClassVar[str] = "plasticity.dash"

    every: int | None = None
    start: int = 1
    lam: float = 0.3
    alpha: float = 0.3


@dataclass(frozen=True)
class RedoConfig(_Checked):
    """ReDo: recycle dormant hidden units of the F and E (per expert) MLPs.

    Attributes:
        every: steps between ReDo checks; null turns ReDo off.
        start: first ReDo check.
        tau: a unit is dormant when its activity divided by its layer's mean is <= tau.
        beta: weight of the newest step in the activity EMA.
    """

    PREFIX: ClassVar[str] = "plasticity.redo"

    every: int | None = None
    start: int = 1
    tau: float = 0.025
    beta: float = 0.1


@dataclass(frozen=True)
class PlasticityConfig(_Checked):
    """Plasticity tools, each on its own cadence (they need the plugin, not native Megatron).

    Attributes:
        fire: the FIRE section.
        dash: the DASH section.
        redo: the ReDo section.
    """

    PREFIX: ClassVar[str] = "plasticity"

    fire: FireConfig = field(default_factory=FireConfig)
    dash: DashConfig = field(default_factory=DashConfig)
    redo: RedoConfig = field(default_factory=RedoConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.fire.steps) or self.dash.every is not None or (
            self.redo.every is not None)

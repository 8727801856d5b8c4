"""Typed settings: the vocabulary shared by recipes, the spec builder and the translator.

Every section is a frozen dataclass deriving from :class:`~megacpp_mcore.settings.schema.Section`;
each field is written once, here: its type (with its range, e.g. ``NonNegativeInt``), its
default, and its doc as the string literal right under it (``megacpp recipe describe`` and
the plugin's ``--megacpp-*`` help read them from there). Every construction (a YAML recipe,
Python code, settings read back from Megatron's args) is checked in ``__post_init__`` by the
one type engine (:mod:`megacpp_mcore.settings.schema`), raising a :class:`RecipeError` that
names the key path and what is accepted. Rules of one section that involve several of its
fields are in its own ``__post_init__``; cross-section rules that need the layout or the
parallel sizes live in ``sizes.py`` and ``rules.py``. How a setting reaches Megatron is the
settings table's business (``table.py``). Pure Python: nothing here imports torch or Megatron.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.settings.schema import (
    ClipFloat,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    Section,
    UnitFloat,
    UnitOpenLowFloat,
)

DType = Literal["fp32", "bf16", "fp16"]
#: the value ``--megacpp-r-num-heads`` takes for ``model.recurrent.num_heads`` null
AUTO_HEADS = "auto"


@dataclass(frozen=True)
class MoEConfig(Section):
    """Mixture-of-experts feed-forward (letter E)."""

    PREFIX: ClassVar[str] = "model.moe"

    num_experts: int = 8
    """routed experts per MoE layer."""
    top_k: int = 2
    """experts each token is routed to."""
    ffn_hidden_size: int = 1024
    """hidden size of one routed expert's MLP."""
    shared_expert_ffn_hidden_size: int | None = None
    """hidden size of the always-on shared expert; null for none."""
    router_load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """load-balancing loss: aux_loss (switch-style, per micro-batch), seq_aux_loss (per sequence),
    or none."""
    aux_loss_coeff: NonNegativeFloat = 1e-2
    """weight of the load-balancing loss."""
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """softmax or sigmoid gate scores."""
    grouped_gemm: bool = True
    """run the experts as one grouped GEMM (GPU); false runs them one by one."""
    token_dispatcher: Literal["alltoall", "allgather", "flex"] = "alltoall"
    """alltoall (expert parallel, GPU), allgather, or flex (DeepEP's fused dispatch; needs the
    deep_ep package, CUDA and tensor x expert parallel > 1)."""
    router_dtype: Literal["fp32", "fp64"] | None = None
    """dtype of the router's scores and probabilities: fp32, fp64, or null for the parameters'
    dtype."""
    permute_fusion: bool = False
    """fuse the token permutation kernels (Megatron's --moe-permute-fusion; needs Transformer
    Engine)."""
    expert_gemm: Literal["te", "torch"] = "te"
    """the kernel of the grouped experts (backend te, grouped_gemm): te (Transformer Engine's
    GroupedLinear, one cuBLAS GEMM per expert, as stock Megatron) or torch (one torch grouped
    GEMM per projection, group boundaries on the GPU: no host work per new token split; bf16,
    Hopper+). Same parameters and checkpoints; layers/grouped_experts.py."""


@dataclass(frozen=True)
class MLAConfig(Section):
    """Multi-latent attention (Megatron's MLA), used by A positions whose variant is mla or dsa."""

    PREFIX: ClassVar[str] = "model.attention.mla"

    q_lora_rank: int | None = 64
    """rank of the query's low-rank (down/up) projection; null projects queries directly (no
    compression)."""
    kv_lora_rank: int = 64
    """rank of the shared key/value latent."""
    qk_head_dim: int = 64
    """per-head query/key channels without position embedding."""
    qk_pos_emb_head_dim: int = 64
    """per-head query/key channels that carry RoPE."""
    v_head_dim: int = 64
    """per-head value channels."""
    rope_type: Literal["rope", "yarn"] = "rope"
    """rope or yarn (Megatron's MLA default when no --rope-type is passed)."""


@dataclass(frozen=True)
class DSAConfig(Section):
    """DeepSeek sparse attention (Megatron's DSA: MLA plus a top-k token indexer)."""

    PREFIX: ClassVar[str] = "model.attention.dsa"

    indexer_heads: int = 8
    """heads of the lightweight indexer that scores past tokens."""
    indexer_head_dim: int = 64
    """channels per indexer head."""
    top_k: int = 256
    """past tokens each query attends to."""
    indexer_loss_coeff: NonNegativeFloat = 0.001
    """weight of the indexer's KL loss against dense attention. 0 turns it off, and then nothing
    trains the indexer: Megatron detaches its inputs, so its weights get no gradient and keep
    their initialisation."""
    rotate_activation: bool = True
    """Hadamard-rotate the indexer's q and k before scoring (Megatron's default; needs
    fast_hadamard_transform on the machine)."""


AttentionVariant = Literal["gqa", "mla", "dsa"]


@dataclass(frozen=True)
class AttentionConfig(Section):
    """Which attention each A position gets (the letter stays A; the variant is a setting).

    A rank is the 0-based index of an A among the main decoder's A layers (the seed's
    NAM56R: MLA at A ranks 0, 4, 8, 12 = layers 1, 17, 33, 49); a layer is its 1-based
    number. Positions not listed get ``variant``. Megatron refuses gqa mixed with mla/dsa
    in one model.
    """

    PREFIX: ClassVar[str] = "model.attention"

    variant: AttentionVariant = "gqa"
    """the variant of every A position not listed below: gqa (Megatron's SelfAttention,
    grouped-query), mla or dsa."""
    mla_ranks: tuple[NonNegativeInt, ...] = ()
    """A ranks (0-based, main decoder) that get MLA."""
    dsa_ranks: tuple[NonNegativeInt, ...] = ()
    """A ranks (0-based, main decoder) that get DSA."""
    mla_layers: tuple[int, ...] = ()
    """layer numbers (1-based, main decoder) that get MLA; each must be an A."""
    dsa_layers: tuple[int, ...] = ()
    """layer numbers (1-based, main decoder) that get DSA; each must be an A."""
    mtp_variant: AttentionVariant | None = None
    """the variant of A layers in multi-token-prediction parts (all parts are identical); null
    means variant."""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """the MLA sizes (used by mla and dsa positions)."""
    dsa: DSAConfig = field(default_factory=DSAConfig)
    """the DSA indexer settings (used by dsa positions)."""


@dataclass(frozen=True)
class MambaConfig(Section):
    """Mamba mixer (letter M): Mamba-2, or Mamba-3."""

    PREFIX: ClassVar[str] = "model.mamba"

    variant: Literal["mamba2", "mamba3"] = "mamba2"
    """mamba2 (Megatron's MambaMixer on GPU) or mamba3 (mamba-ssm's Mamba-3 SISO scan: trapezoidal
    rule, data-dependent rotary angles, no convolution)."""
    state_dim: int = 128
    """SSM state size N per group."""
    head_dim: int = 64
    """channels per SSM head P."""
    num_groups: int = 8
    """B/C groups (split across tensor-parallel ranks)."""
    num_heads: int | None = None
    """SSM heads; null means 2 * hidden_size / head_dim (expand 2)."""
    conv_kernel: int = 4
    """width of the depthwise causal convolution (Mamba-2 only)."""
    chunk_size: int = 128
    """chunk length of the chunked scan (fused and reference)."""
    rope_fraction: float = 0.5
    """Mamba-3: share of the state's channels rotated by the data-dependent angles (0.5 or 1.0)."""
    mimo: bool = False
    """Mamba-3: multi-input multi-output form (mamba-ssm's TileLang kernels)."""
    mimo_rank: int = 4
    """Mamba-3 MIMO rank (inputs/outputs per head)."""


@dataclass(frozen=True)
class RecurrentConfig(Section):
    """Recurrent mixer (letter R): an M2RNN-style matrix-state RNN.

    Per head the state is a k_head_dim x v_head_dim matrix h, updated as
    ``h = f * h + (1 - f) * tanh(h @ W + k (x) v)`` and read out as ``y = q . h``. The
    defaults are this project's per-head layer; the seed system's layer (recipes/nam56r.yaml)
    is qk_heads shared, num_heads null, in_proj_order qkvfg, skip_scale per_channel, norm
    whole, proj_init linear_default, forget_bf16 true.
    """

    PREFIX: ClassVar[str] = "model.recurrent"

    num_heads: int | None = field(default=16, metadata={"null_token": AUTO_HEADS})
    """recurrent (value, forget, gate, W) heads, split across tensor-parallel ranks; null means
    hidden_size // (k_head_dim + v_head_dim), the seed's rule (51 at hidden 4096, K 64, V 16)."""
    k_head_dim: int = 64
    """rows of each head's state (size of q and k)."""
    v_head_dim: int = 16
    """columns of each head's state (size of v, the gate and the output)."""
    conv_kernel: int = 4
    """width of the depthwise causal convolution on q, k, v."""
    backward_chunk: int = 64
    """time steps between stored states in the fused kernel's backward (recomputed inside a chunk),
    so activation memory stays linear in sequence length."""
    qk_heads: Literal["per_head", "shared"] = "per_head"
    """per_head (one q and one k head per head) or shared (ONE q head and ONE k head read by every
    head, the seed's layer; the scan broadcasts them, no copies)."""
    in_proj_order: Literal["qkvgf", "qkvfg"] = "qkvgf"
    """order of the parts of the fused input projection: qkvgf (q|k|v|g|f, this project's) or qkvfg
    (q|k|v|f|g, the seed's)."""
    skip_scale: Literal["per_head", "per_channel"] = "per_head"
    """the D skip ``y + D * v``: per_head (one scalar per head) or per_channel (a [heads, V]
    matrix, the seed's)."""
    norm: Literal["per_head", "whole"] = "per_head"
    """the RMS norm before out_proj: per_head (over each head's V channels) or whole (one norm over
    all heads' concatenated output, the seed's)."""
    proj_init: Literal["normal", "linear_default"] = "normal"
    """normal (Megatron's normal init with init_std; out_proj scaled by depth) or linear_default
    (torch nn.Linear's default kaiming-uniform, the seed's)."""
    forget_bf16: bool = False
    """round the forget gate to bfloat16 before the scan (the seed's)."""

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
class GatedDeltaNetConfig(Section):
    """Megatron's Gated DeltaNet mixer (letter G; needs flash-linear-attention)."""

    PREFIX: ClassVar[str] = "model.gdn"

    num_key_heads: int = 16
    """query/key heads."""
    num_value_heads: int = 32
    """value heads (a multiple of num_key_heads)."""
    key_head_dim: int = 128
    """channels per query/key head."""
    value_head_dim: int = 128
    """channels per value head."""
    conv_kernel: int = 4
    """width of the short causal convolution."""


@dataclass(frozen=True)
class NgramHashConfig(Section):
    """Hashed token n-gram features added to the token embeddings (the seed system's n-gram
    hash embedding: an input enrichment, off by default; needs the plugin).
    """

    PREFIX: ClassVar[str] = "model.ngram_hash"

    enabled: bool = False
    """add the features to every token embedding (and to the MTP depths', which share the
    embedding)."""
    orders: tuple[int, ...] = (2, 3)
    """n-gram orders hashed (2: a token and the one before it; 3: two before it)."""
    tables_per_order: int = 8
    """hash tables per order, each with its own hash function."""
    table_size: int = 500_000
    """rows per table (each table takes a distinct prime at or above it)."""
    embed_dim: int = 16
    """width of a table row; the rows of all tables are concatenated and projected to hidden_size
    by a zero-initialised linear, so a model starts out as it would without the features."""
    hash_seed: int = 1234
    """seed of the hash functions and the tables' initialisation; a checkpoint's tables only mean
    something under the same hashes, so it is fixed per recipe."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled and not self.orders:
            raise RecipeError("model.ngram_hash.orders is empty; give the n-gram orders to "
                              "hash (e.g. [2, 3]) or set model.ngram_hash.enabled false")


@dataclass(frozen=True)
class ModelConfig(Section):
    """Model shape shared by every block family, plus one nested section per mixer family."""

    PREFIX: ClassVar[str] = "model"

    hidden_size: int = 256
    """width of the residual stream."""
    ffn_hidden_size: int = 1024
    """hidden size of the dense MLP (letter F)."""
    num_attention_heads: int = 4
    """query heads of attention layers (letter A)."""
    num_query_groups: int | None = None
    """key/value heads (grouped-query attention); null means one per query head."""
    kv_channels: int | None = None
    """channels per attention head; null means hidden_size / num_attention_heads."""
    vocab_size: int = 512
    """tokenizer vocabulary (Megatron pads it for tensor parallelism)."""
    seq_length: int = 256
    """training sequence length (also the maximum position)."""
    position_embedding: Literal["rope", "none"] = "rope"
    """rope or none."""
    rotary_base: int = 10000
    """RoPE base period."""
    activation: Literal["swiglu", "squared_relu", "gelu"] = "swiglu"
    """MLP activation: swiglu (gated SiLU), squared_relu or gelu."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """RMSNorm or LayerNorm."""
    norm_epsilon: PositiveFloat = 1e-5
    """epsilon of every norm."""
    init_std: PositiveFloat = 0.02
    """standard deviation of the normal weight initialisation."""
    tie_embeddings: bool = False
    """share the input embedding and the output layer."""
    hidden_dropout: UnitFloat = 0.0
    """dropout on the residual branches."""
    attention_dropout: UnitFloat = 0.0
    """dropout on attention probabilities."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """the attention variant of each A position (gqa, mla, dsa) and their sizes."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """the MoE section (letter E)."""
    mamba: MambaConfig = field(default_factory=MambaConfig)
    """the Mamba section (letter M: Mamba-2 or Mamba-3)."""
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    """the recurrent mixer section (letter R)."""
    gdn: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)
    """the Gated DeltaNet section (letter G)."""
    ngram_hash: NgramHashConfig = field(default_factory=NgramHashConfig)
    """hashed n-gram features added to the token embeddings."""

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
class PrecisionConfig(Section):
    """Numeric precision."""

    PREFIX: ClassVar[str] = "precision"

    params_dtype: DType = "bf16"
    """dtype of parameters and activations: bf16, fp16 or fp32 (Megatron keeps fp32 main weights in
    the optimizer for bf16/fp16)."""
    grad_reduce_in_fp32: bool = True
    """reduce gradients across data-parallel ranks in fp32."""


@dataclass(frozen=True)
class ParallelConfig(Section):
    """Parallel sizes and sharding."""

    PREFIX: ClassVar[str] = "parallel"

    tensor: int = 1
    """tensor-parallel size (splits heads, experts' and MLP hidden dims)."""
    pipeline: int = 1
    """pipeline-parallel size; with '|' in the pattern it must equal the stages."""
    expert: int = 1
    """expert-parallel size (splits the experts of each MoE layer)."""
    context: int = 1
    """context-parallel size (splits the sequence)."""
    sequence_parallel: bool = False
    """shard activations along the sequence inside tensor-parallel regions (needs tensor > 1)."""
    distributed_optimizer: bool = False
    """shard optimizer state across data-parallel ranks."""
    fsdp: Literal["none", "torch_fsdp2", "megatron_fsdp"] = "none"
    """none, torch_fsdp2 or megatron_fsdp."""


@dataclass(frozen=True)
class TrainingConfig(Section):
    """Training schedule and optimizer."""

    PREFIX: ClassVar[str] = "training"

    micro_batch_size: int = 1
    """sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """sequences per optimizer step across all ranks."""
    train_iters: int = 100
    """optimizer steps."""
    lr: PositiveFloat = 3e-4
    """peak learning rate."""
    min_lr: NonNegativeFloat = 3e-5
    """final learning rate of the decay."""
    lr_warmup_iters: NonNegativeInt = 10
    """linear warm-up steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    """constant, linear or cosine."""
    weight_decay: NonNegativeFloat = 0.1
    """decoupled weight decay."""
    adam_beta1: UnitFloat = 0.9
    """Adam beta1."""
    adam_beta2: UnitFloat = 0.95
    """Adam beta2."""
    clip_grad: ClipFloat = 1.0
    """global gradient-norm clip (0 disables)."""
    seed: NonNegativeInt = 1234
    """random seed."""
    log_interval: int = 10
    """steps between log lines and receipt updates."""
    save_interval: int | None = None
    """steps between checkpoints (null: only at the end when saving)."""
    eval_interval: int | None = None
    """steps between validation runs (null: no validation)."""
    eval_iters: NonNegativeInt = 10
    """validation batches per run."""


@dataclass(frozen=True)
class DataConfig(Section):
    """Training data."""

    PREFIX: ClassVar[str] = "data"

    source: Literal["embedded", "mock", "path"] = "embedded"
    """embedded (the project's own text, byte-tokenized), mock (Megatron's mock data) or path
    (Megatron indexed datasets named in paths)."""
    paths: tuple[str, ...] = ()
    """indexed dataset prefixes (without .bin/.idx) when source is path."""
    split: str = "98,2,0"
    """train/valid/test split of the documents, as Megatron's --split."""
    tokenizer: Literal["byte"] | None = "byte"
    """byte (vocabulary 256 + specials) for embedded/path data, or null for mock."""


@dataclass(frozen=True)
class LoggingConfig(Section):
    """Logs and receipts."""

    PREFIX: ClassVar[str] = "logging"

    receipt_dir: str = "runs"
    """folder for run receipts (JSON), one file per run."""
    tensorboard_dir: str | None = None
    """Megatron's TensorBoard folder; null for none."""


@dataclass(frozen=True)
class StpConfig(Section):
    """STP, the trajectory-straightness auxiliary loss (arXiv 2602.22617), on decoder layers."""

    PREFIX: ClassVar[str] = "stp"

    enabled: bool = False
    """add the STP loss (needs the plugin: --target native refuses it)."""
    weight: NonNegativeFloat = 0.1
    """the loss weight lambda (total loss = LM loss + weight * STP); the paper uses 0.1."""
    start_step: int = 1
    """first iteration (1-based) whose gradient includes STP; before it the loss is computed
    without gradient, for logging only."""
    ramp_steps: NonNegativeInt = 0
    """iterations over which the weight rises linearly from weight / ramp_steps to weight, starting
    at start_step (0: no ramp)."""
    triples: int = 64
    """samples (triples or spans) drawn per sequence and micro-batch."""
    min_gap: int = 1
    """minimum distance in positions between consecutive sampled points."""
    layers: tuple[int, ...] = ()
    """decoder layer numbers (1-based) whose outputs are straightened; empty means the last decoder
    layer (multi-token-prediction layers are never used)."""
    form: Literal["triple", "span"] = "triple"
    """triple (1 - cos(h[t] - h[r], h[r] - h[s]) for s < r < t, the paper's form) or span (a random
    span's displacement against the rest of its document, the released code's random_span form)."""


#: phase boundaries ``plasticity.fire.steps`` may name instead of a step number
FirePhase = Literal["warmup_end", "stp_start", "seq_length_change"]
FIRE_PHASES: tuple[str, ...] = typing.get_args(FirePhase)
#: the boundary known only at launch: the first step after loading a checkpoint trained at
#: another sequence length
SEQ_LENGTH_CHANGE = "seq_length_change"


@dataclass(frozen=True)
class FireConfig(Section):
    """FIRE: re-initialise weight matrices to their nearest isometry at chosen steps."""

    PREFIX: ClassVar[str] = "plasticity.fire"

    steps: tuple[int | FirePhase, ...] = ()
    """optimizer steps (1-based) before which FIRE runs, or named phase boundaries: warmup_end (the
    first step after the learning-rate warm-up), stp_start (the step the STP loss starts),
    seq_length_change (the first step after loading a checkpoint trained at another sequence
    length, as when context extension continues a run with a longer --seq-length; a resume at
    the same length is no boundary; Megatron launcher only); empty turns FIRE off."""
    mode: Literal["all", "attention", "context_extension"] = "all"
    """which parts: all (every declared matrix part), attention (the A layers' query, key, value
    and output) or context_extension (only the A layers' query and key)."""
    method: Literal["exact", "paper"] = "exact"
    """exact (polar factor by SVD: singular values equal sqrt(d_out/d_in)) or paper
    (Frobenius-normalise, then 5 cubic Newton-Schulz steps, as the reference code)."""
    rewarmup_iters: NonNegativeInt = 0
    """after each FIRE step, ramp the learning rate linearly back up over this many steps; 0 turns
    the re-warm-up off."""


def fire_phase_steps(lr_warmup_iters: int, stp: Any) -> dict[str, int | None]:
    """The step each named phase boundary of ``plasticity.fire.steps`` stands for in this
    recipe (None: the recipe has no such boundary). ``seq_length_change`` is known only at
    launch."""
    return {"warmup_end": lr_warmup_iters + 1 if lr_warmup_iters else None,
            "stp_start": stp.start_step if stp.enabled else None, SEQ_LENGTH_CHANGE: None}


@dataclass(frozen=True)
class DashConfig(Section):
    """DASH: shrink weight rows whose gradient EMA points along the row."""

    PREFIX: ClassVar[str] = "plasticity.dash"

    every: int | None = None
    """steps between DASH steps; null turns DASH off."""
    start: int = 1
    """first DASH step."""
    lam: UnitOpenLowFloat = 0.3
    """smallest row scale (the paper's lambda)."""
    alpha: UnitOpenLowFloat = 0.3
    """weight of the newest gradient in the gradient EMA."""


@dataclass(frozen=True)
class RedoConfig(Section):
    """ReDo: recycle dormant hidden units of the F and E (per expert) MLPs."""

    PREFIX: ClassVar[str] = "plasticity.redo"

    every: int | None = None
    """steps between ReDo checks; null turns ReDo off."""
    start: int = 1
    """first ReDo check."""
    tau: UnitFloat = 0.025
    """a unit is dormant when its activity divided by its layer's mean is <= tau."""
    beta: UnitOpenLowFloat = 0.1
    """weight of the newest step in the activity EMA."""


@dataclass(frozen=True)
class PlasticityConfig(Section):
    """Plasticity tools, each on its own cadence (they need the plugin, not native Megatron)."""

    PREFIX: ClassVar[str] = "plasticity"

    fire: FireConfig = field(default_factory=FireConfig)
    """the FIRE section."""
    dash: DashConfig = field(default_factory=DashConfig)
    """the DASH section."""
    redo: RedoConfig = field(default_factory=RedoConfig)
    """the ReDo section."""

    @property
    def enabled(self) -> bool:
        return bool(self.fire.steps) or self.dash.every is not None or (
            self.redo.every is not None)

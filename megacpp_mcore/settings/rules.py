"""Cross-field rules of a recipe: what no single field can say about itself.

:func:`recipe_problems` lists every rule a resolved recipe breaks (the layout against MTP
depths, R lowering and pipeline stages; sizes against the layout and the parallel split, via
``sizes.py``; attention variants; MoE, parallel, precision, training, STP, plasticity and
data combinations), each naming its fields. ``Recipe.__post_init__`` refuses a recipe that
breaks any. Single-field checks are the fields' own (``config.py``, ``schema.py``). Pure
Python.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from megacpp_mcore.errors import PatternError
from megacpp_mcore.settings.attention import LATENT, attention_problems, used_variants
from megacpp_mcore.settings.config import SEQ_LENGTH_CHANGE, fire_phase_steps
from megacpp_mcore.settings.sizes import size_problems

if TYPE_CHECKING:
    from megacpp_mcore.settings.recipe import Recipe

#: smallest vocabulary of the byte tokenizer: 256 byte values + end-of-document
#: (megacpp_mcore.train.data.VOCAB_SIZE; kept here so recipes stay import-light).
BYTE_VOCAB_SIZE = 257


def recipe_problems(recipe: Recipe) -> list[str]:
    """Every cross-field rule ``recipe`` breaks (empty if none); each names its fields.

    Size rules come from :func:`megacpp_mcore.settings.sizes.size_problems` (shared with the model
    builder) and are checked only for the block families the layout uses, plus the family
    R is lowered to (``r_lowering``). Two attention rules are checked for every model,
    because Megatron's argument validation asserts them even without attention layers:
    ``hidden_size`` divisible by ``num_attention_heads`` (unless ``kv_channels`` is set) and
    heads divisible by the tensor-parallel size. The data-parallel size is not known until
    launch (it is the world size over TP x PP x CP), so ``global_batch_size`` is only
    checked against ``micro_batch_size`` here; Megatron checks it against
    ``micro_batch_size * data-parallel size`` when it starts.
    """
    try:
        layout = recipe.layout
    except PatternError as err:
        return [f"pattern {recipe.pattern!r} (depth {recipe.depth}): {err}"]
    model, parallel, training = recipe.model, recipe.parallel, recipe.training
    precision, data = recipe.precision, recipe.data
    problems: list[str] = []

    # layout: MTP, R lowering, pipeline stages
    if recipe.mtp_depths != layout.mtp_depth:
        problems.append(
            f"mtp_depths ({recipe.mtp_depths}) does not match the pattern's "
            f"{layout.mtp_depth} multi-token-prediction part(s) ('/' parts of pattern "
            f"{layout.canonical!r}): the MTP layers come from the pattern, one identical '/' "
            "part per depth ('AEM/MA/MA' has 2 MTP depths)"
        )
    if recipe.r_lowering is not None and not layout.has("R"):
        problems.append(
            f"r_lowering ({recipe.r_lowering}) is set but the layout {layout.canonical!r} has "
            "no R layer; remove r_lowering"
        )
    if len(layout.stages) > 1:
        if len(layout.stages) != parallel.pipeline:
            problems.append(
                f"the pattern has {len(layout.stages)} pipeline stages ('|') but "
                f"parallel.pipeline is {parallel.pipeline}: they must be equal"
            )
    elif layout.depth % parallel.pipeline:
        problems.append(
            f"depth ({layout.depth}) must be divisible by parallel.pipeline "
            f"({parallel.pipeline}) when the pattern has no '|' stage marks"
        )

    # sizes (shared with the model builder), for the families in use
    size = size_problems(layout, model, parallel)
    if recipe.r_lowering is not None and layout.has("R"):
        size += [p for p in size_problems(recipe.lowered_layout, model, parallel)
                 if p not in size]
    problems += size
    if not recipe.lowered_layout.has("A"):
        # Megatron validates these for every model (validate_args / TransformerConfig).
        heads = model.num_attention_heads
        if model.kv_channels is None and model.hidden_size % heads:
            problems.append(
                f"model.hidden_size ({model.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({heads}) (or set model.kv_channels): Megatron "
                "checks it even without attention layers"
            )
        if heads % parallel.tensor:
            problems.append(
                f"model.num_attention_heads ({heads}) must be divisible by parallel.tensor "
                f"({parallel.tensor}): Megatron checks it even without attention layers"
            )
    problems += attention_problems(layout, model.attention)  # also: lists without any A
    if layout.has("A"):
        latent = used_variants(recipe.lowered_layout, model.attention, layout) & set(LATENT)
        if latent and model.num_query_groups is not None:
            problems.append(
                f"model.num_query_groups ({model.num_query_groups}) with {sorted(latent)} "
                "attention: multi-latent attention has no query groups (Megatron refuses "
                "--group-query-attention with it); set it null")
        if latent and model.position_embedding != "rope":
            problems.append(
                f"model.position_embedding {model.position_embedding} with {sorted(latent)} "
                "attention: MLA always applies RoPE to its qk_pos_emb_head_dim channels; "
                "use rope")
    moe = model.moe
    if recipe.lowered_layout.has("E") and moe.top_k == 1 and moe.router_score_function == (
            "softmax"):
        problems.append(
            "model.moe.top_k 1 with model.moe.router_score_function softmax: a softmax over "
            "the one chosen expert is constant (zero router gradient), and Megatron refuses it "
            "without a pre-top-k softmax, which recipes do not set; use top_k >= 2 or sigmoid"
        )
    if (recipe.lowered_layout.has("E") and moe.token_dispatcher == "flex"
            and parallel.tensor * parallel.expert == 1):
        problems.append(
            "model.moe.token_dispatcher flex with parallel.tensor x parallel.expert = 1: "
            "Megatron's DeepEP dispatcher asserts TP x EP > 1; use alltoall (or allgather) "
            "at expert-parallel size 1")
    if parallel.expert > 1 and not recipe.lowered_layout.has("E"):
        problems.append(
            f"parallel.expert ({parallel.expert}) > 1 but the layout has no E (MoE) layer"
        )

    # parallel
    if parallel.distributed_optimizer and parallel.fsdp != "none":
        problems.append(
            f"parallel.distributed_optimizer and parallel.fsdp ({parallel.fsdp}) are exclusive: "
            "FSDP shards the optimizer state itself"
        )
    if parallel.fsdp == "torch_fsdp2":
        fsdp2 = {
            "parallel.pipeline": (parallel.pipeline, parallel.pipeline == 1, "1"),
            "parallel.expert": (parallel.expert, parallel.expert == 1, "1"),
            "model.tie_embeddings": (model.tie_embeddings, not model.tie_embeddings, "false"),
            "precision.params_dtype": (precision.params_dtype,
                                       precision.params_dtype != "fp16", "bf16 or fp32"),
        }
        for key, (value, ok, need) in fsdp2.items():
            if not ok:
                problems.append(f"parallel.fsdp torch_fsdp2 needs {key} {need}, got {value} "
                                "(Megatron's rule)")

    # precision
    if precision.params_dtype == "fp32" and not precision.grad_reduce_in_fp32:
        problems.append(
            "precision.grad_reduce_in_fp32 is false but precision.params_dtype is fp32: fp32 "
            "gradients are always reduced in fp32"
        )

    # training
    if training.global_batch_size % training.micro_batch_size:
        problems.append(
            f"training.global_batch_size ({training.global_batch_size}) must be divisible by "
            f"training.micro_batch_size ({training.micro_batch_size}) (and, at launch, by "
            "micro_batch_size x the data-parallel size)"
        )
    if training.min_lr > training.lr:
        problems.append(
            f"training.min_lr ({training.min_lr}) must not exceed training.lr ({training.lr})"
        )
    if training.lr_warmup_iters >= training.train_iters:
        problems.append(
            f"training.lr_warmup_iters ({training.lr_warmup_iters}) must be smaller than "
            f"training.train_iters ({training.train_iters})"
        )
    if training.eval_interval is not None and training.eval_iters == 0:
        problems.append(
            f"training.eval_interval ({training.eval_interval}) is set but "
            "training.eval_iters is 0; set eval_iters >= 1 or eval_interval null"
        )

    # stp
    bad_layers = [n for n in recipe.stp.layers if n > layout.depth]
    if bad_layers:
        problems.append(
            f"stp.layers {bad_layers}: decoder layers are numbered 1..{layout.depth} "
            "(multi-token-prediction layers cannot be chosen)"
        )
    # plasticity
    fire = recipe.plasticity.fire
    phases = fire_phase_steps(training.lr_warmup_iters, recipe.stp)
    missing = {"warmup_end": "training.lr_warmup_iters is 0 (no warm-up to end)",
               "stp_start": "stp.enabled is false"}
    for name in sorted({s for s in fire.steps if isinstance(s, str)} & set(missing)):
        if phases[name] is None:
            problems.append(f"plasticity.fire.steps names {name!r} but {missing[name]}")
    steps = [phases.get(s) if isinstance(s, str) else s for s in fire.steps
             if s != SEQ_LENGTH_CHANGE]
    late = [s for s in steps if s is not None and s > training.train_iters]
    if late:
        problems.append(f"plasticity.fire.steps {late} lie beyond training.train_iters "
                        f"({training.train_iters})")
    if len(set(steps)) != len(steps):
        problems.append(f"plasticity.fire.steps {list(fire.steps)} repeats a step (named "
                        f"phases here: {', '.join(f'{k}={v}' for k, v in phases.items() if v)})")

    # data
    if data.source == "path" and not data.paths:
        problems.append("data.source is path but data.paths is empty")
    if data.source != "path" and data.paths:
        problems.append(f"data.paths is set but data.source is {data.source} (paths are read "
                        "only with source path)")
    if data.source == "embedded" and data.tokenizer != "byte":
        problems.append("data.source embedded needs data.tokenizer byte (the embedded text is "
                        "byte-tokenized)")
    if data.tokenizer == "byte" and model.vocab_size < BYTE_VOCAB_SIZE:
        problems.append(
            f"model.vocab_size ({model.vocab_size}) is smaller than the byte tokenizer's "
            f"{BYTE_VOCAB_SIZE} ids (256 bytes + end-of-document)"
        )
    split = data.split.split(",")
    if len(split) != 3 or not all(re.fullmatch(r"\d+(\.\d*)?", s.strip()) for s in split) or (
        sum(float(s) for s in split) <= 0
    ):
        problems.append(
            f"data.split ({data.split!r}) must be three non-negative weights "
            "'train,valid,test' with a positive sum, e.g. '98,2,0'"
        )
    return problems



__all__ = ["BYTE_VOCAB_SIZE", "recipe_problems"]

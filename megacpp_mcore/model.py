"""``build_model``: the one entry point from a layout and typed settings to a Megatron model.

It validates sizes against the layout and the tensor/expert-parallel split (``sizes``),
lets the backend dispatcher decide how each family is built (``backend``), translates the
settings into Megatron's ``TransformerConfig`` and builds Megatron's ``HybridModel`` over this
project's stack spec. Megatron's model-parallel state must be initialised first (see
``megacpp_mcore.distributed`` for a single-process or gloo set-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from megacpp_mcore.backend import BackendPlan, resolve_backend
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.ngram_hash import attach_ngram_hash
from megacpp_mcore.layout import Layout
from megacpp_mcore.plan import ModelPlan, plan_layers
from megacpp_mcore.settings.config import ModelConfig, ParallelConfig, PrecisionConfig
from megacpp_mcore.settings.sizes import plugin_problems, size_problems
from megacpp_mcore.settings.table import FIXED, config_kwargs
from megacpp_mcore.specs.stack import build_stack_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: activation name (model.activation) -> Megatron's activation function
ACTIVATIONS = {"swiglu": F.silu, "squared_relu": squared_relu, "gelu": F.gelu}
VOCAB_MULTIPLE = 128  # Megatron's --make-vocab-size-divisible-by default


def current_parallel() -> ParallelConfig:
    """The parallel sizes of Megatron's initialised model-parallel state."""
    if not parallel_state.model_parallel_is_initialized():
        raise SpecError("Megatron's model-parallel state is not initialised; call "
                        "megacpp_mcore.distributed.init_process_groups() (or Megatron's "
                        "initialize_model_parallel) before build_model")
    return ParallelConfig(
        tensor=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline=parallel_state.get_pipeline_model_parallel_world_size(),
        expert=parallel_state.get_expert_model_parallel_world_size(),
        context=parallel_state.get_context_parallel_world_size(),
    )


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    multiple = VOCAB_MULTIPLE * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config(
    layout: Layout,
    model: ModelConfig,
    precision: PrecisionConfig,
    parallel: ParallelConfig,
    plan: BackendPlan,
    overrides: Mapping[str, Any] | None = None,
    layer_plan: ModelPlan | None = None,
) -> TransformerConfig:
    """Megatron's TransformerConfig for these settings, from the settings table.

    Every row with a ``config`` field whose families the layout uses (and whose feature it
    builds: the MLA/DSA sizes only with MLA/DSA positions) contributes its field(s), then
    the table's fixed fields (fusions and the like, GPU-only kernels off on CPU): the same
    values Megatron's launcher derives from the translated flags. ``overrides`` sets stock
    ``TransformerConfig`` fields the settings do not cover (the benchmark's tuned runs, e.g.
    ``moe_router_fusion``); they win over the above. ``layer_plan`` is the per-layer plan
    (resolved from ``layout`` and ``model`` if not given): it says whether the model builds
    MLA/DSA.
    """
    root = SimpleNamespace(model=model, precision=precision, parallel=parallel, layout=layout,
                           lowered_layout=layout)
    kwargs = config_kwargs(root, layout.letters + "".join(layout.mtp))
    kwargs.update({fixed.config: fixed.value(root, plan.cuda) for fixed in FIXED
                   if fixed.applies(root)})
    kwargs["activation_func"] = ACTIVATIONS[kwargs["activation_func"]]
    kwargs["params_dtype"] = DTYPES[kwargs["params_dtype"]]
    if layout.has("E"):
        # the dispatcher may swap alltoall for allgather without CUDA (recorded in the plan)
        kwargs["moe_token_dispatcher_type"] = plan.path("E")
    kwargs.update(
        num_layers=layout.depth,
        use_cpu_initialization=not plan.cuda,
        transformer_impl="transformer_engine" if plan.built == "te" else "local",
        # Megatron scales output-layer init by the layer count; a hybrid layer is one block
        # (mixer or MLP), not two, which is what is_hybrid_model tells it.
        is_hybrid_model=True,
        mtp_num_layers=layout.mtp_depth or None,
    )
    # MLA/DSA positions: Megatron's MLATransformerConfig (one per model); the sizes came from
    # the table's model.attention.* rows above. DSA's Hadamard rotation is the machine's
    # decision (the backend plan), not a setting's value.
    latent = (layer_plan or plan_layers(layout, model)).latent
    if "dsa" in latent:
        kwargs["dsa_indexer_rotate_activation"] = plan.dsa_rotate
    kwargs.update(overrides or {})
    return (MLATransformerConfig if latent else TransformerConfig)(**kwargs)


def r_head_dims(model: ModelConfig) -> tuple[int, int]:
    """The R layers' (k_head_dim, v_head_dim), which decide whether the fused scan runs."""
    return model.recurrent.k_head_dim, model.recurrent.v_head_dim


def stage_problem(layout: Layout, pipeline: int, *, one_rank_builds_all: bool = True
                  ) -> str | None:
    """Why ``layout``'s '|' stages cannot be built at this pipeline size, or None.

    Megatron builds, on each pipeline rank, the '|' segment of that rank (more segments
    than ranks are virtual pipeline stages); with a different count and no virtual pipeline
    it builds a part of the model and calls it the model. ``build_model`` builds every
    stage on one rank (``one_rank_builds_all``); Megatron's own builder cannot.
    """
    stages = len(layout.stages)
    if stages > 1 and stages != pipeline and (pipeline > 1 or not one_rank_builds_all):
        also = " (or pipeline size 1, which builds every stage in one process)" if (
            one_rank_builds_all) else ""
        return (f"the pattern {layout.canonical!r} has {stages} pipeline stages ('|') but the "
                f"pipeline-parallel size is {pipeline}: they must be equal{also}; Megatron "
                "would build only the stages of its ranks")
    return None


def built_stages(plan: ModelPlan, pipeline: int) -> ModelPlan:
    """The plan as built at this pipeline size: with one pipeline rank the '|' stage marks
    are dropped, so every stage is built (Megatron would otherwise build only the first)."""
    if pipeline == 1 and len(plan.layout.stages) > 1:
        return plan.without_stages()
    return plan


def model_backend(requested: str, layout: Layout, model: ModelConfig,
                  dsa_rotate: bool | None = None, layer_plan: ModelPlan | None = None
                  ) -> BackendPlan:
    """The backend plan for ``model``'s settings on this machine (``resolve_backend`` fed
    from the recipe: dispatcher, R head sizes, M variant, A variants, DSA rotation, R form,
    expert kernel); ``dsa_rotate`` overrides what the recipe asks of DSA's indexer.
    ``layer_plan`` is the per-layer plan (resolved from ``layout`` and ``model`` if not
    given): its A variants are what the dispatcher records and checks."""
    layer_plan = layer_plan or plan_layers(layout, model)
    return resolve_backend(
        requested, layout, moe_dispatcher=model.moe.token_dispatcher,
        r_head_dims=r_head_dims(model), mamba_variant=model.mamba.variant,
        attention_variants=layer_plan.variants("A"),
        dsa_rotate=(model.attention.dsa.rotate_activation if dsa_rotate is None
                    else dsa_rotate),
        r_form=model.recurrent.form() if layout.has("R") else None,
        expert_gemm=model.moe.expert_gemm, grouped_gemm=model.moe.grouped_gemm)


def build_model(
    layout: Layout,
    model: ModelConfig,
    *,
    backend: str = "auto",
    precision: PrecisionConfig | None = None,
    plan: BackendPlan | None = None,
    sequence_parallel: bool = False,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> HybridModel:
    """A Megatron ``HybridModel`` for ``layout`` with ``model``'s sizes.

    The parallel split is Megatron's current one (``sequence_parallel`` as asked). A pattern
    with '|' stages needs as many pipeline ranks as stages, or one, which builds them all.
    The model carries the dispatcher's record as ``model.backend_record`` (what each family
    asked for and what was built) and its per-layer plan as ``model.layer_plan``. ``overrides``:
    stock TransformerConfig fields to set on top (see :func:`transformer_config`).
    """
    parallel = replace(current_parallel(), sequence_parallel=sequence_parallel)
    precision = precision or PrecisionConfig()
    problems = size_problems(layout, model, parallel) + plugin_problems(layout, parallel)
    if problems:
        raise SpecError("the model does not fit its layout and parallel split:\n  "
                        + "\n  ".join(problems))
    if layout.mtp and parallel.pipeline > 1:
        raise SpecError("multi-token prediction with pipeline parallelism is not supported "
                        "by this builder yet")
    problem = stage_problem(layout, parallel.pipeline)
    if problem:
        raise SpecError(problem)
    layer_plan = plan_layers(layout, model)
    plan = plan or model_backend(backend, layout, model, layer_plan=layer_plan)
    layer_plan = layer_plan.with_paths(plan.paths())
    config = transformer_config(layout, model, precision, parallel, plan, overrides,
                                layer_plan=layer_plan)
    pp_first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    pp_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    hybrid = HybridModel(
        config=config,
        hybrid_stack_spec=build_stack_spec(layer_plan, model, plan),
        vocab_size=padded_vocab_size(model.vocab_size, parallel.tensor),
        max_sequence_length=model.seq_length,
        hybrid_layer_pattern=built_stages(layer_plan, parallel.pipeline).megatron_pattern,
        pre_process=pp_first if pre_process is None else pre_process,
        post_process=pp_last if post_process is None else post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_base=model.rotary_base,
    )
    attach_ngram_hash(hybrid, model.ngram_hash)
    hybrid.backend_record = plan.record()
    hybrid.layer_plan = layer_plan
    if not plan.cuda:
        from megacpp_mcore.cpu_support import adapt_model_for_cpu

        adapt_model_for_cpu(hybrid)
    return hybrid

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
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig

from megacpp_mcore.backend import BackendPlan, resolve_backend
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import Layout
from megacpp_mcore.settings.config import ModelConfig, ParallelConfig, PrecisionConfig
from megacpp_mcore.settings.sizes import size_problems
from megacpp_mcore.specs.stack import build_stack_spec
from megacpp_mcore.symbols import PLUGIN_SYMBOLS, megatron_pattern

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = {"swiglu": (F.silu, True), "squared_relu": (squared_relu, False),
               "gelu": (F.gelu, False)}
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
) -> TransformerConfig:
    """Megatron's TransformerConfig for these settings (only the families in use).

    ``overrides`` sets stock ``TransformerConfig`` fields the typed settings do not cover
    (the benchmark's tuned columns, e.g. ``moe_router_fusion``); they win over the above.
    """
    activation, gated = ACTIVATIONS[model.activation]
    kwargs = dict(
        num_layers=layout.depth,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        init_method_std=model.init_std,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        params_dtype=DTYPES[precision.params_dtype],
        bf16=precision.params_dtype == "bf16",
        fp16=precision.params_dtype == "fp16",
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert,
        context_parallel_size=parallel.context,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not plan.cuda,
        transformer_impl="transformer_engine" if plan.built == "te" else "local",
        # Megatron scales output-layer init by the layer count; a hybrid layer is one block
        # (mixer or MLP), not two, which is what is_hybrid_model tells it.
        is_hybrid_model=True,
        mtp_num_layers=layout.mtp_depth or None,
        # Fusions that need apex or CUDA-only kernels; the unfused paths compute the same.
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=plan.cuda,
        bias_activation_fusion=plan.cuda,
        apply_rope_fusion=False,
    )
    if layout.has("E"):
        moe = model.moe
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_router_load_balancing_type=moe.router_load_balancing,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_router_score_function=moe.router_score_function,
            moe_grouped_gemm=moe.grouped_gemm,
            moe_token_dispatcher_type=plan.path("E"),
        )
    if layout.has("M"):
        kwargs.update(
            mamba_state_dim=model.mamba.state_dim,
            mamba_head_dim=model.mamba.head_dim,
            mamba_num_groups=model.mamba.num_groups,
            mamba_num_heads=model.mamba_heads,
        )
    if layout.has("G"):
        gdn = model.gdn
        kwargs.update(
            linear_conv_kernel_dim=gdn.conv_kernel,
            linear_key_head_dim=gdn.key_head_dim,
            linear_value_head_dim=gdn.value_head_dim,
            linear_num_key_heads=gdn.num_key_heads,
            linear_num_value_heads=gdn.num_value_heads,
        )
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


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

    The parallel split is Megatron's current one (``sequence_parallel`` as asked). The model
    carries the dispatcher's record as ``model.backend_record`` (what each family asked for
    and what was built). ``overrides``: stock TransformerConfig fields to set on top (see
    :func:`transformer_config`).
    """
    parallel = replace(current_parallel(), sequence_parallel=sequence_parallel)
    precision = precision or PrecisionConfig()
    problems = size_problems(layout, model, parallel)
    if problems:
        raise SpecError("the model does not fit its layout and parallel split:\n  "
                        + "\n  ".join(problems))
    if layout.mtp and parallel.pipeline > 1:
        raise SpecError("multi-token prediction with pipeline parallelism is not supported "
                        "by this builder yet")
    plan = plan or resolve_backend(backend, layout, moe_dispatcher=model.moe.token_dispatcher)
    config = transformer_config(layout, model, precision, parallel, plan, overrides)
    pp_first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    pp_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    hybrid = HybridModel(
        config=config,
        hybrid_stack_spec=build_stack_spec(layout, model, plan),
        vocab_size=padded_vocab_size(model.vocab_size, parallel.tensor),
        max_sequence_length=model.seq_length,
        hybrid_layer_pattern=megatron_pattern(layout, PLUGIN_SYMBOLS),
        pre_process=pp_first if pre_process is None else pre_process,
        post_process=pp_last if post_process is None else post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_base=model.rotary_base,
    )
    hybrid.backend_record = plan.record()
    if not plan.cuda:
        from megacpp_mcore.cpu_support import adapt_model_for_cpu

        adapt_model_for_cpu(hybrid)
    return hybrid

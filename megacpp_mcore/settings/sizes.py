"""Size rules a model must satisfy for its layout and parallel split (pure Python).

One list of rules, used by the model builder (which refuses to build) and by recipe
validation (which refuses to load), so the two never disagree: every divisibility a
tensor/expert/context-parallel split implies, including the ones Megatron itself asserts only
while building layers (shared-expert width, Mamba heads and groups under context
parallelism). Only the families the layout
uses are checked. Each problem names the fields in conflict.
"""

from __future__ import annotations

from megacpp_mcore.layout import Layout
from megacpp_mcore.settings.config import ModelConfig, ParallelConfig


def _divides(problems: list[str], value: int, value_name: str, by: int, by_name: str) -> None:
    if by > 0 and value % by:
        problems.append(f"{value_name} ({value}) must be divisible by {by_name} ({by})")


def _mamba3_problems(mamba, tp: int) -> list[str]:
    problems = []
    if mamba.rope_fraction not in (0.5, 1.0):
        problems.append(f"model.mamba.rope_fraction ({mamba.rope_fraction}) must be 0.5 or 1.0")
    elif int(mamba.state_dim * mamba.rope_fraction) < 2:
        problems.append(f"model.mamba.state_dim ({mamba.state_dim}) x rope_fraction "
                        f"({mamba.rope_fraction}) leaves no rotary pair for Mamba-3")
    if tp > 1:
        problems.append(
            f"model.mamba.variant mamba3 runs at parallel.tensor 1 only (got {tp}): its "
            "rotary-angle rows of in_proj and its B/C norm weights are shared by all heads, so "
            "split over tensor-parallel ranks they would need a gradient all-reduce that "
            "Megatron's column-parallel projection does not do")
    return problems


def size_problems(layout: Layout, model: ModelConfig, parallel: ParallelConfig) -> list[str]:
    """Every size rule ``model`` breaks for ``layout`` under ``parallel``; empty if none."""
    problems: list[str] = []
    tp, tp_name = parallel.tensor, "parallel.tensor"
    positive = {
        "model.hidden_size": model.hidden_size,
        "model.vocab_size": model.vocab_size,
        "model.seq_length": model.seq_length,
    }
    for name, value in positive.items():
        if value <= 0:
            problems.append(f"{name} must be positive, got {value}")
    if problems:
        return problems

    if layout.has("A"):
        heads, groups = model.num_attention_heads, model.query_groups
        if model.kv_channels is None:
            _divides(problems, model.hidden_size, "model.hidden_size", heads,
                     "model.num_attention_heads (set model.kv_channels to decouple)")
        _divides(problems, heads, "model.num_attention_heads", groups, "model.num_query_groups")
        _divides(problems, heads, "model.num_attention_heads", tp, tp_name)
        _divides(problems, groups, "model.num_query_groups", tp, tp_name)
    if layout.has("F"):
        _divides(problems, model.ffn_hidden_size, "model.ffn_hidden_size", tp, tp_name)
    if layout.has("E"):
        moe = model.moe
        if not 1 <= moe.top_k <= moe.num_experts:
            problems.append(f"model.moe.top_k ({moe.top_k}) must be between 1 and "
                            f"model.moe.num_experts ({moe.num_experts})")
        _divides(problems, moe.num_experts, "model.moe.num_experts", parallel.expert,
                 "parallel.expert")
        _divides(problems, moe.ffn_hidden_size, "model.moe.ffn_hidden_size", tp, tp_name)
        if moe.shared_expert_ffn_hidden_size is not None:
            _divides(problems, moe.shared_expert_ffn_hidden_size,
                     "model.moe.shared_expert_ffn_hidden_size", tp, tp_name)
        if tp > 1 and not parallel.sequence_parallel:
            problems.append("MoE layers with parallel.tensor > 1 need parallel.sequence_parallel "
                            "(Megatron's rule)")
    if layout.has("M"):
        mamba, heads = model.mamba, model.mamba_heads
        if model.mamba.num_heads is None:
            _divides(problems, 2 * model.hidden_size, "2 * model.hidden_size", mamba.head_dim,
                     "model.mamba.head_dim (or set model.mamba.num_heads)")
        _divides(problems, heads, "Mamba heads (model.mamba.num_heads)", mamba.num_groups,
                 "model.mamba.num_groups")
        _divides(problems, heads, "Mamba heads (model.mamba.num_heads)", tp, tp_name)
        _divides(problems, mamba.num_groups, "model.mamba.num_groups", tp, tp_name)
        cp = parallel.context
        if cp > 1 and heads % tp == 0 and mamba.num_groups % tp == 0:
            # Megatron's MambaContextParallel splits each TP rank's heads and groups over CP
            local_heads, local_groups = heads // tp, mamba.num_groups // tp
            per_rank = " per tensor-parallel rank"
            _divides(problems, local_heads, f"Mamba heads{per_rank} ({heads} / {tp})", cp,
                     "parallel.context")
            if local_groups < cp:
                _divides(problems, cp, "parallel.context", local_groups,
                         f"model.mamba.num_groups{per_rank} ({mamba.num_groups} / {tp})")
            else:
                _divides(problems, local_groups,
                         f"model.mamba.num_groups{per_rank} ({mamba.num_groups} / {tp})", cp,
                         "parallel.context")
        if mamba.variant == "mamba3":
            problems.extend(_mamba3_problems(mamba, tp))
    if layout.has("R"):
        r = model.recurrent
        heads = r.heads(model.hidden_size)
        if heads < 1:
            problems.append(f"model.recurrent.num_heads null gives hidden_size // (k_head_dim + "
                            f"v_head_dim) = {heads} heads; set num_heads")
        _divides(problems, heads, "model.recurrent.num_heads" + (
            "" if r.num_heads is not None else " (null: hidden // (K + V))"), tp, tp_name)
        seed_form = [k for k, v in (("qk_heads", r.qk_heads == "shared"),
                                    ("norm", r.norm == "whole")) if v]
        if tp > 1 and seed_form:
            problems.append(
                f"model.recurrent.{' and model.recurrent.'.join(seed_form)} (the seed's R "
                f"form) with parallel.tensor {tp}: shared q/k heads and one norm over the "
                "whole output are whole-layer quantities; the plugin builds them at tensor "
                "parallel 1 only (refused, not replicated)")
    if layout.has("G"):
        gdn = model.gdn
        _divides(problems, gdn.num_value_heads, "model.gdn.num_value_heads", gdn.num_key_heads,
                 "model.gdn.num_key_heads")
        _divides(problems, gdn.num_key_heads, "model.gdn.num_key_heads", tp, tp_name)
        _divides(problems, gdn.num_value_heads, "model.gdn.num_value_heads", tp, tp_name)
    if parallel.sequence_parallel:
        if tp == 1:
            problems.append("parallel.sequence_parallel needs parallel.tensor > 1")
        _divides(problems, model.seq_length, "model.seq_length", tp,
                 "parallel.tensor (sequence parallel splits the sequence)")
    if parallel.context > 1:
        _divides(problems, model.seq_length, "model.seq_length", 2 * parallel.context,
                 "2 * parallel.context")
    return problems


def plugin_problems(layout: Layout, parallel: ParallelConfig) -> list[str]:
    """Rules of the layers this plugin builds itself (its M and R mixers), on top of
    :func:`size_problems`; the native target builds M with Megatron's own MambaMixer."""
    problems: list[str] = []
    if parallel.context > 1:
        for letter, name in (("M", "Mamba-2"), ("R", "recurrent")):
            if layout.has(letter):
                problems.append(
                    f"parallel.context ({parallel.context}) > 1: the plugin's {name} mixer "
                    f"({letter} layers {', '.join(map(str, layout.positions(letter)))}) does "
                    "not split the sequence; use parallel.context 1 (or, for M, the native "
                    "target)")
    return problems

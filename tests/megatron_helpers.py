"""Running Megatron's own argument parser in tests, on a CPU machine.

``megatron_parse(plan)`` feeds a translation's flags to ``parse_and_validate_args`` as a GPU
machine of the plan's size would see them, with Megatron's global state saved and restored
around it. Plugin plans get the plugin's extra args provider; native plans get none, as
stock Megatron-LM has none.
"""

import contextlib
import importlib
import io
import os
import sys
from unittest import mock

import megatron.core.num_microbatches_calculator as microbatches
import pytest
import torch
from megatron.training import arguments, global_vars
from megatron.training.argument_utils import core_transformer_config_from_args

from megacpp_mcore.megatron.args import add_megacpp_args


@contextlib.contextmanager
def gpu_machine(plan, extra_argv=()):
    """Megatron's view of the machine the plan targets: a Hopper GPU per rank, plan.nproc
    ranks, the plan's environment (all restored afterwards)."""
    env = {"WORLD_SIZE": str(plan.nproc), "RANK": "0", "LOCAL_RANK": "0"}
    unset = [e.name for e in plan.env if e.value is None]
    env.update({e.name: e.value for e in plan.env if e.value is not None})
    rope = importlib.import_module("megatron.core.models.common.embeddings.rope_utils")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))  # restores all of os.environ
        for name in unset:
            os.environ.pop(name, None)
        stack.enter_context(mock.patch.object(arguments, "get_device_arch_version",
                                              lambda: 9))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_capability",
                                              lambda *a, **k: (9, 0)))
        # Transformer Engine's fused RoPE exists on the GPU machine (native runs need TE)
        if rope.fused_apply_rotary_pos_emb is None:
            stack.enter_context(mock.patch.object(rope, "fused_apply_rotary_pos_emb",
                                                  lambda *a, **k: None))
        argv = ["pretrain_nam.py", *plan.argv(), *extra_argv]
        stack.enter_context(mock.patch.object(sys, "argv", argv))
        yield


@contextlib.contextmanager
def own_megatron_globals():
    """Megatron's global args/tokenizer/microbatch state, empty inside and restored after."""
    saved = {k: v for k, v in vars(global_vars).items() if k.startswith("_GLOBAL_")}
    saved_calculator = microbatches._GLOBAL_NUM_MICROBATCHES_CALCULATOR
    global_vars.unset_global_variables()
    try:
        yield
    finally:
        global_vars.unset_global_variables()
        for key, value in saved.items():
            setattr(global_vars, key, value)
        microbatches._GLOBAL_NUM_MICROBATCHES_CALCULATOR = saved_calculator


@contextlib.contextmanager
def parsed_megatron_args(plan, extra_argv=()):
    """Inside: Megatron's global args parsed and validated from the plan's flags (plus
    ``extra_argv``), as ``pretrain`` would see them; everything is restored afterwards."""
    out = io.StringIO()
    with own_megatron_globals(), gpu_machine(plan, extra_argv):
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                args = arguments.parse_and_validate_args(
                    extra_args_provider=add_megacpp_args if plan.target == "plugin" else None)
        except SystemExit as exit:  # argparse: unknown flag or bad value
            pytest.fail(f"Megatron's parser exited ({exit.code}):\n{out.getvalue()[-3000:]}")
        except AssertionError as err:  # validate_args asserts
            pytest.fail(f"Megatron rejected the flags: {err}\n{plan.args_line()}")
        yield args


def megatron_parse(plan):
    """Megatron's parsed, validated args (and its TransformerConfig) for the plan's flags."""
    with parsed_megatron_args(plan) as args:
        return args, core_transformer_config_from_args(args)


def mla_attention_on_cpu(monkeypatch, q_lora_rank=32):
    """Megatron's MLASelfAttention from the plugin's local spec, on the CPU: its rotary
    embedding asks torch.cuda for a device at construction (the only CUDA use before a
    forward), which is pointed at the CPU here."""
    from megatron.core.transformer import MLATransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.specs.attention import attention_layer_spec
    from megacpp_mcore.specs.providers import MegacppLocalSpecProvider

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    config = MLATransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6,
        add_bias_linear=False, use_cpu_initialization=True, rope_type="rope",
        normalization="RMSNorm")
    mla = attention_layer_spec(MegacppLocalSpecProvider(), "mla").submodules.self_attention
    return build_module(mla, config=config, layer_number=1)

"""Shared fixtures: a tiny model configuration and a single-process Megatron set-up."""

import pytest

from megacpp_mcore.settings.config import MambaConfig, ModelConfig, MoEConfig, RecurrentConfig


def tiny_model_config(**overrides) -> ModelConfig:
    """A model small enough to build, run and train on a CPU in about a second."""
    settings = dict(
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=256,
        seq_length=32,
        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=64, grouped_gemm=False),
        mamba=MambaConfig(state_dim=16, head_dim=16, num_groups=2, chunk_size=8),
        recurrent=RecurrentConfig(num_heads=4, k_head_dim=16, v_head_dim=16),
    )
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron's model-parallel state for one CPU process (gloo, world size 1)."""
    from megacpp_mcore.distributed import init_process_groups

    init_process_groups(seed=1234)
    yield

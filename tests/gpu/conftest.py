"""GPU tests run on the GPU machine only (``pytest -m gpu tests/gpu``); CI deselects them."""

import pytest
import torch


@pytest.fixture(scope="session")
def megatron_gpu():
    """Megatron's model-parallel state for one GPU process (NCCL, world size 1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megacpp_mcore.distributed import init_process_groups

    init_process_groups(seed=1234)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

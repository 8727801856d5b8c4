"""GPU tests run on the GPU machine only (``pytest -m gpu tests/gpu``); CI deselects them."""

import pytest
import torch

from tests.compare import rel_err  # noqa: F401  (re-exported: the GPU tests compare with it)


@pytest.fixture(scope="session")
def megatron_gpu():
    """Megatron's model-parallel state for one GPU process (NCCL, world size 1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megacpp_mcore.distributed import init_process_groups

    init_process_groups(seed=1234)
    yield

"""Process groups and seeds for code that builds models outside Megatron's launcher.

Megatron's ``pretrain`` does this itself on GPU. Tests, benchmarks and the CPU training path
call :func:`init_process_groups`: it starts ``torch.distributed`` (NCCL on GPU, gloo on CPU;
a single process needs no launcher), initialises Megatron's model-parallel state and seeds
the RNGs the way Megatron does. On CPU there is no CUDA RNG tracker to seed: this project's
layers initialise from the CPU generator and Megatron's linears use
``use_cpu_initialization``, so nothing forks the tracker when building on CPU.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def free_port() -> int:
    """A local TCP port nobody listens on right now (another process may take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_groups(
    tensor: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    context: int = 1,
    seed: int = 1234,
    backend: str | None = None,
) -> None:
    """Start torch.distributed (if needed) and Megatron's model-parallel groups; seed RNGs.

    Under torchrun the rank and world size come from the environment; a lone process is
    world size 1 on a free local port.
    """
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        lone = "RANK" not in os.environ
        if lone:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        for attempt in range(3):
            try:
                dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
                break
            except dist.DistNetworkError:
                # a lone process's free port can be taken by another process between
                # finding it and listening on it: pick another (a launcher's port is kept)
                if not lone or attempt == 2:
                    raise
                os.environ["MASTER_PORT"] = str(free_port())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert,
        context_parallel_size=context,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed as Megatron's ``_set_random_seed`` does: the same CPU seed on every tensor-parallel
    rank of a pipeline stage, the CUDA tracker (GPU only) per model-parallel rank."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed + 100 * pp_rank)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed + 100 * pp_rank)


def destroy_process_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

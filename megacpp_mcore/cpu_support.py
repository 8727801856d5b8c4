"""What running Megatron-Core models (the supported release, ``supported.MEGATRON_CORE``) on a
CPU needs, in one place.

Megatron builds and runs its models on CPU over gloo, but assumes CUDA in a few places.
Each assumption and how this project meets it:

1. RoPE: ``RotaryEmbedding.get_emb`` moves its frequencies to ``torch.cuda.current_device()``
   on first use. :func:`adapt_model_for_cpu` gives the model's rotary module a subclass that
   keeps them on the CPU (the computation is otherwise Megatron's).
2. MoE: the router's ``gating`` moves its weight to CUDA on first use; the model's routers
   get a subclass that leaves it where it is. The alltoall token dispatcher allocates CUDA
   streams when built; without CUDA the backend dispatcher (``backend.resolve_backend``)
   builds E layers with the allgather dispatcher, which routes identically at
   expert-parallel size 1, and records that.
3. Attention: Megatron's local ``DotProductAttention`` allocates its score matrix from a
   CUDA-only global memory buffer. The local backend uses ``layers.sdpa.SDPACoreAttention``
   (torch SDPA) instead, on CPU and GPU alike.
4. Initialisation: the CUDA RNG tracker cannot be seeded without CUDA. Megatron's linears are
   built with ``use_cpu_initialization`` and this project's mixers initialise from the CPU
   generator (``layers.mixer_common``), so nothing forks the tracker.
5. Training: Megatron's optimizers, DDP wrapper and ``pretrain`` require CUDA; the CPU
   training path uses a plain PyTorch optimizer over the same model (``cpu_train``).
6. Sequence parallelism gathers and multi-token prediction's loss tracking allocate on
   ``torch.cuda.current_device()``: neither runs on CPU. The model builder refuses MTP
   without CUDA (``backend.resolve_backend``); tensor parallelism without sequence
   parallelism runs on CPU (tested at TP=2 over gloo).

Only the CPU path calls into this module; the GPU path never depends on it.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class CPURotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding without the move to CUDA in ``get_emb``."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1)
            emb = emb.view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


class CPUTopKRouter(TopKRouter):
    """Megatron's TopKRouter without the move to CUDA in ``gating``."""

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        return router_gating_linear(input, self.weight, self.bias, dtype)


_CPU_CLASSES = {RotaryEmbedding: CPURotaryEmbedding, TopKRouter: CPUTopKRouter}


def adapt_model_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Make a freshly built Megatron model runnable on CPU (assumptions 1 and 2 above)."""
    for module in model.modules():
        cpu_class = _CPU_CLASSES.get(type(module))
        if cpu_class is not None:
            module.__class__ = cpu_class
    return model

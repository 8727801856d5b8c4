"""Norm and projections of the project's mixers (M, R) per backend.

``te`` fuses the pre-norm into the input projection (as stock Megatron's Mamba layer does),
so the layer's own norm is absent; ``local`` uses a torch norm then Megatron's local linears.
"""

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megacpp_mcore.layers.norm import LocalNorm


def projections(backend: str):
    """``(norm or None, in_proj, out_proj)`` for a mixer layer."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return None, TELayerNormColumnParallelLinear, TERowParallelLinear
    return LocalNorm, ColumnParallelLinear, RowParallelLinear

"""The local backend's norm: torch RMSNorm/LayerNorm that also works with sequence parallel.

Megatron's ``WrappedTorchNorm`` refuses sequence parallelism, because a norm weight that sees
only this rank's slice of the sequence needs its gradient summed across the tensor-parallel
group. Megatron's gradient finalisation does exactly that for parameters flagged
``sequence_parallel``; this builder flags them, so the local backend keeps SP. The spec
builders get it from ``specs.providers.MegacppLocalSpecProvider.layer_norm()``.
"""

from __future__ import annotations

import torch


class LocalNorm:
    """Builds ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` per ``config.normalization``.

    A class with ``__new__`` (like Megatron's norm builders) so ``build_module`` calls it.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(
                f"normalization {config.normalization!r} is not supported by the local backend; "
                "accepted: RMSNorm, LayerNorm"
            )
        if not config.use_cpu_initialization and torch.cuda.is_available():
            norm = norm.to(torch.cuda.current_device())
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

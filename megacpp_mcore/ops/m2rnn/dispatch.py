"""The one place a path of the M2RNN scan is chosen: ``m2rnn_scan(..., path=...)``."""

from __future__ import annotations

import torch

from megacpp_mcore.ops.m2rnn.reference import m2rnn_scan_reference

PATHS = ("reference", "fused")


def m2rnn_scan(q, k, v, f, W, h0=None, *, path: str, backward_chunk: int = 64):
    """Run the M2RNN scan on the named path: ``"reference"`` or ``"fused"`` (CUDA only).

    There is no silent fallback: an unknown path, or the fused path on a non-CUDA tensor,
    raises ``ValueError``. Triton is imported on first use of the fused path, so the
    reference path works where Triton is absent.
    """
    if path not in PATHS:
        raise ValueError(f"m2rnn scan: unknown path {path!r}; accepted: {', '.join(PATHS)}")
    if path == "reference":
        return m2rnn_scan_reference(q, k, v, f, W, h0)
    if not isinstance(q, torch.Tensor) or q.device.type != "cuda":
        where = q.device if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"m2rnn scan: the fused path needs CUDA tensors, got q on {where}; "
                         "use path='reference' on CPU")
    from megacpp_mcore.ops.m2rnn.fused import m2rnn_scan_fused

    return m2rnn_scan_fused(q, k, v, f, W, h0, backward_chunk=backward_chunk)

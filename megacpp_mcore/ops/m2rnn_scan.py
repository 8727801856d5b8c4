"""The R mixer's scan: an M2RNN matrix-state recurrence, as a reference and a fused op.

Per batch ``b`` and head ``h`` the state is a ``K x V`` matrix (``K`` = k_head_dim,
``V`` = v_head_dim) and ``W`` is the head's ``V x V`` state matrix::

    pre_t = h_{t-1} @ W + outer(k_t, v_t)
    h_t   = f_t * h_{t-1} + (1 - f_t) * tanh(pre_t)      # f_t: one scalar per (b, t, head)
    y_t   = q_t^T h_t                                     # [V], a sum over the K rows

Shapes: ``q, k: [B, T, H, K]`` (or ``[B, T, 1, K]``: one q and one k head shared by every
head, broadcast without copies), ``v: [B, T, H, V]``, ``f: [B, T, H]``, ``W: [H, V, V]``,
``h0: [B, H, K, V]`` or None (zeros). Every path returns ``(y, h_last)`` with ``y: [B, T, H, V]``
in q's dtype and ``h_last: [B, H, K, V]`` in float32 (float64 when an input is float64).

Two paths share this contract, chosen in one place (``m2rnn_scan(..., path=...)``):

* ``reference``: plain PyTorch, any device, autograd through torch ops. The CPU path and the
  parity reference.
* ``fused``: Triton kernels (``m2rnn_triton.py``), CUDA only, forward and backward.
"""

from __future__ import annotations

import torch

from megacpp_mcore.ops.m2rnn_checks import check_scan_inputs

PATHS = ("reference", "fused")


def m2rnn_scan_reference(q, k, v, f, W, h0=None):
    """The M2RNN scan in plain PyTorch: a time loop vectorised over batch and heads.

    Computes, for t = 1..T, ``h_t = f_t h_{t-1} + (1 - f_t) tanh(h_{t-1} W + k_t v_t^T)`` and
    ``y_t = q_t^T h_t`` in float32 (float64 when any input is float64), with autograd through
    ordinary torch ops (so backward keeps every step's state: fine for a reference, not for
    training at length). Returns ``y [B, T, H, V]`` in q's dtype and ``h_last [B, H, K, V]`` in
    the compute dtype. This is the CPU path and the ground truth the fused kernel is tested
    against; it is written to be read, not to be fast.
    """
    B, T, H, K, V = check_scan_inputs(q, k, v, f, W, h0)
    inputs = (q, k, v, f, W) if h0 is None else (q, k, v, f, W, h0)
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    qc, kc, vc, fc, Wc = (x.to(cdt) for x in (q, k, v, f, W))
    qc, kc = qc.expand(B, T, H, K), kc.expand(B, T, H, K)  # shared q/k: a view, no copy
    h = q.new_zeros((B, H, K, V), dtype=cdt) if h0 is None else h0.to(cdt)
    ys = []
    for t in range(T):
        kv = kc[:, t, :, :, None] * vc[:, t, :, None, :]  # outer(k_t, v_t): [B, H, K, V]
        pre = torch.einsum("bhkv,hvw->bhkw", h, Wc) + kv
        ft = fc[:, t, :, None, None]
        h = ft * h + (1.0 - ft) * torch.tanh(pre)
        ys.append(torch.einsum("bhk,bhkv->bhv", qc[:, t], h))
    y = torch.stack(ys, dim=1).to(q.dtype)
    return y, h


def m2rnn_scan_fused(q, k, v, f, W, h0=None, backward_chunk=64):
    """The fused Triton scan (CUDA); see ``megacpp_mcore.ops.m2rnn_triton.m2rnn_scan_fused``.

    Triton is imported on first use, so the reference path works where Triton is absent.
    """
    from megacpp_mcore.ops.m2rnn_triton import m2rnn_scan_fused as fused

    return fused(q, k, v, f, W, h0, backward_chunk=backward_chunk)


def m2rnn_scan(q, k, v, f, W, h0=None, *, path: str, backward_chunk: int = 64):
    """Run the M2RNN scan on the named path: ``"reference"`` or ``"fused"`` (CUDA only).

    There is no silent fallback: an unknown path, or the fused path on a non-CUDA tensor,
    raises ``ValueError``.
    """
    if path not in PATHS:
        raise ValueError(f"m2rnn scan: unknown path {path!r}; accepted: {', '.join(PATHS)}")
    if path == "reference":
        return m2rnn_scan_reference(q, k, v, f, W, h0)
    if not isinstance(q, torch.Tensor) or q.device.type != "cuda":
        where = q.device if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"m2rnn scan: the fused path needs CUDA tensors, got q on {where}; "
                         "use path='reference' on CPU")
    return m2rnn_scan_fused(q, k, v, f, W, h0, backward_chunk=backward_chunk)

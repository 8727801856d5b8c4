"""The M2RNN scan in plain PyTorch (path ``reference``): the R mixer's CPU path and the ground
truth of the fused kernel. The recurrence and its shapes: ``megacpp_mcore/ops/m2rnn/__init__.py``.
"""

from __future__ import annotations

import torch

from megacpp_mcore.ops.m2rnn.checks import check_scan_inputs


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


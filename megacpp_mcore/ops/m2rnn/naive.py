"""The M2RNN scan written out step by step, batch by batch, head by head: the oracle that the
reference and fused paths are held to (slow; float64 in tests). Imports only torch."""

from __future__ import annotations

import torch


def naive_m2rnn_scan(q, k, v, f, W, h0):
    """The recurrence written out per step, per batch, per head (float64, plain loops)."""
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[-1]
    shared = q.shape[2] == 1  # one q and one k head read by every head
    state = [[h0[b, h] for h in range(H)] for b in range(B)]
    ys = [[[] for _ in range(H)] for _ in range(B)]
    for t in range(T):
        for b in range(B):
            for h in range(H):
                prev = state[b][h]
                hq = 0 if shared else h
                pre = prev @ W[h] + torch.outer(k[b, t, hq], v[b, t, h])
                new = f[b, t, h] * prev + (1 - f[b, t, h]) * torch.tanh(pre)
                state[b][h] = new
                ys[b][h].append(q[b, t, hq] @ new)  # [V]
    y = torch.stack([torch.stack([torch.stack(ys[b][h]) for h in range(H)], dim=1)
                     for b in range(B)])  # [B, T, H, V]
    h_last = torch.stack([torch.stack(state[b]) for b in range(B)])
    assert y.shape == (B, T, H, V) and h_last.shape == (B, H, K, V)
    return y, h_last

"""The Mamba-2 SSD recurrence one step at a time: the oracle of the chunked reference
(``ssd/reference.py``). Imports only torch."""

from __future__ import annotations

import torch


def naive_ssd_scan(x, dt, A, B, C, D, initial_state):
    """S_t = exp(dt A) S_{t-1} + dt x_t B_t^T ; y_t = S_t C_t + D x_t, one step at a time."""
    _batch, length, heads, _ = x.shape
    per_group = heads // B.shape[2]
    state = initial_state.clone()
    ys = []
    for t in range(length):
        step = []
        for h in range(heads):
            g = h // per_group
            decay = torch.exp(dt[:, t, h] * A[h])[:, None, None]
            state_h = decay * state[:, h] + dt[:, t, h, None, None] * torch.einsum(
                "bp,bn->bpn", x[:, t, h], B[:, t, g])
            state = torch.cat([state[:, :h], state_h[:, None], state[:, h + 1:]], dim=1)
            step.append(torch.einsum("bpn,bn->bp", state_h, C[:, t, g]) + D[h] * x[:, t, h])
        ys.append(torch.stack(step, dim=1))
    return torch.stack(ys, dim=1), state

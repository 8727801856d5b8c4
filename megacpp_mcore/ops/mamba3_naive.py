"""The Mamba-3 SISO recurrence one step at a time: the oracle for the chunked reference
(the step rule of mamba-ssm's ``mamba3_siso_step`` kernel, in plain PyTorch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megacpp_mcore.ops.mamba3_reference import rotate_pairs


def naive_mamba3_siso(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None):
    """``S = a S + a dt (1 - lam) v_prev k_prev^T + dt lam v k^T``, ``y = (S q + D v) silu(z)``."""
    batch, length, heads, p = V.shape
    repeat = heads // Q.shape[2]
    state = V.new_zeros(batch, heads, p, Q.shape[3])
    theta = V.new_zeros(batch, heads, Angles.shape[3])
    k_prev, v_prev = V.new_zeros(batch, heads, Q.shape[3]), V.new_zeros(batch, heads, p)
    ys = []
    for t in range(length):
        dt, adt = DT[:, :, t], ADT[:, :, t]
        theta = theta + torch.tanh(Angles[:, t]) * math.pi * dt[..., None]
        q = rotate_pairs(Q[:, t].repeat_interleave(repeat, dim=1) + Q_bias, theta)
        k = rotate_pairs(K[:, t].repeat_interleave(repeat, dim=1) + K_bias, theta)
        v, alpha, lam = V[:, t], torch.exp(adt), torch.sigmoid(Trap[:, :, t])
        previous = torch.einsum("bhp,bhn->bhpn", v_prev, k_prev)
        current = torch.einsum("bhp,bhn->bhpn", v, k)
        state = (alpha[..., None, None] * state
                 + (alpha * dt * (1 - lam))[..., None, None] * previous
                 + (dt * lam)[..., None, None] * current)
        y = torch.einsum("bhpn,bhn->bhp", state, q)
        if D is not None:
            y = y + D[:, None] * v
        if Z is not None:
            y = y * F.silu(Z[:, t])
        ys.append(y)
        k_prev, v_prev = k, v
    return torch.stack(ys, dim=1)

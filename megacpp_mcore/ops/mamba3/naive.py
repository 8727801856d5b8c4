"""The Mamba-3 SISO recurrence one step at a time: the oracle of the chunked reference
(``mamba3/reference.py``; the step rule of mamba-ssm's ``mamba3_siso_step`` kernel, in plain
PyTorch). Imports only torch and math: the rotation is written out here, pair by pair."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Channel pairs (2i, 2i+1) of ``x [..., n]`` turned by ``theta[..., i]``, one pair at a
    time; pairs past ``theta``'s width are left as they are."""
    channels = list(x.unbind(-1))
    for i, angle in enumerate(theta.unbind(-1)):
        x0, x1 = channels[2 * i], channels[2 * i + 1]
        channels[2 * i] = x0 * torch.cos(angle) - x1 * torch.sin(angle)
        channels[2 * i + 1] = x0 * torch.sin(angle) + x1 * torch.cos(angle)
    return torch.stack(channels, dim=-1)


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
        q = _rotate(Q[:, t].repeat_interleave(repeat, dim=1) + Q_bias, theta)
        k = _rotate(K[:, t].repeat_interleave(repeat, dim=1) + K_bias, theta)
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

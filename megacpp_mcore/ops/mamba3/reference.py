"""Mamba-3 SISO scan: a chunked plain-PyTorch reference (the CPU path of the Mamba-3 M mixer).

Same arguments and function as mamba-ssm 2.3.2's ``mamba3_siso_combined`` (training form:
no input states, no variable lengths). Per head h, with ``q = rot(Q + Q_bias_h, theta_t)`` and
``k = rot(K + K_bias_h, theta_t)`` (adjacent channel pairs rotated by the data-dependent
angle ``theta_t = sum_{s<=t} pi tanh(Angles_s) DT_s``; pairs past ``Angles``' width stay)::

    alpha_t = exp(ADT_t)     lambda_t = sigmoid(Trap_t)
    S_t = alpha_t S_{t-1} + alpha_t DT_t (1 - lambda_t) v_{t-1} k_{t-1}^T + DT_t lambda_t v_t k_t^T
    y_t = (S_t q_t + D_h v_t) * silu(Z_t)

(the trapezoidal rule of the Mamba-3 paper: each input enters at its own step with weight
``lambda`` and at the next step with weight ``1 - lambda``). The chunked form folds the two
weights into one ``scale_s = DT_s lambda_s + DT_{s+1} (1 - lambda_{s+1})`` on ``v_s k_s^T``
and removes the next-step share from the diagonal, as the SISO kernel does;
``mamba3/naive.py`` is the step-by-step oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megacpp_mcore.ops.ssd.reference import chunked_scan


def rotate_pairs(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x [..., n]`` by ``theta [..., a]`` (a <= n/2)."""
    width = 2 * theta.shape[-1]
    pairs = x[..., :width].unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., width:]], dim=-1)


def check_siso_inputs(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles) -> None:
    """Shapes as mamba-ssm's SISO kernel takes them; a ValueError names the mismatch."""
    batch, length, qk_heads, qk_dim = Q.shape
    heads = V.shape[2]
    expected = {
        "K": (K.shape, (batch, length, qk_heads, qk_dim)),
        "V": (V.shape[:2], (batch, length)),
        "ADT": (ADT.shape, (batch, heads, length)),
        "DT": (DT.shape, (batch, heads, length)),
        "Trap": (Trap.shape, (batch, heads, length)),
        "Q_bias": (Q_bias.shape, (heads, qk_dim)),
        "K_bias": (K_bias.shape, (heads, qk_dim)),
        "Angles": (Angles.shape[:3], (batch, length, heads)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"Mamba-3 input {name} has shape {tuple(got)}, expected {want}")
    if heads % qk_heads:
        raise ValueError(f"Mamba-3 heads ({heads}) must be a multiple of Q/K heads ({qk_heads})")
    if qk_dim % 2 or Angles.shape[3] > qk_dim // 2:
        raise ValueError(f"Mamba-3 rotary angles ({Angles.shape[3]}) must cover at most half "
                         f"of an even Q/K head dim ({qk_dim})")


def rotated_qk(Q, K, DT, Q_bias, K_bias, Angles):
    """Per-head ``q, k [b, l, h, n]``: biases added, rotated by the accumulated angles."""
    repeat = Angles.shape[2] // Q.shape[2]
    q = Q.repeat_interleave(repeat, dim=2) + Q_bias
    k = K.repeat_interleave(repeat, dim=2) + K_bias
    theta = torch.cumsum(torch.tanh(Angles) * math.pi * DT.transpose(1, 2)[..., None], dim=1)
    return rotate_pairs(q, theta), rotate_pairs(k, theta)


def mamba3_siso_reference(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None,
                          chunk_size: int = 64) -> torch.Tensor:
    """Mamba-3 SISO outputs ``[b, l, h, p]`` (float32; float64 for float64 ``V``).

    ``Q, K [b, l, g, n]``, ``V, Z [b, l, h, p]``, ``ADT, DT, Trap [b, h, l]``,
    ``Q_bias, K_bias [h, n]``, ``Angles [b, l, h, a]``, ``D [h]``.
    """
    check_siso_inputs(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles)
    compute = torch.float64 if V.dtype == torch.float64 else torch.float32
    Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles = (
        t.to(compute) for t in (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles))
    q, k = rotated_qk(Q, K, DT, Q_bias, K_bias, Angles)
    dt, lam = DT.transpose(1, 2), torch.sigmoid(Trap).transpose(1, 2)  # [b, l, h]
    now = dt * lam
    next_share = F.pad(dt[:, 1:] * (1 - lam[:, 1:]), (0, 0, 0, 1))  # enters at step s + 1
    y, _ = chunked_scan(V * (now + next_share)[..., None], ADT.transpose(1, 2), k, q,
                        chunk_size)
    y = y - (next_share * (q * k).sum(-1))[..., None] * V  # S_t holds only the "now" share
    if D is not None:
        y = y + D.to(compute)[:, None] * V
    if Z is not None:
        y = y * F.silu(Z.to(compute))
    return y

"""Input checks shared by every path of the R scan (reference and fused), below both."""

from __future__ import annotations

import torch

#: head sizes the fused (Triton) scan is built for; the reference scan takes any size.
SUPPORTED_K = (16, 32, 64, 128, 256)
SUPPORTED_V = (16, 32, 64)


def fused_head_dims_problem(k_head_dim: int, v_head_dim: int) -> str | None:
    """Why the fused scan cannot run these head sizes, or None."""
    if k_head_dim in SUPPORTED_K and v_head_dim in SUPPORTED_V:
        return None
    return (f"the fused M2RNN scan supports k_head_dim in {SUPPORTED_K} and v_head_dim in "
            f"{SUPPORTED_V}, got {k_head_dim} and {v_head_dim}")


def check_scan_inputs(q, k, v, f, W, h0=None) -> tuple[int, int, int, int, int]:
    """Check the shapes, dtypes and devices every path shares; return ``(B, T, H, K, V)``.

    ``q`` and ``k`` are ``[B, T, H, K]``, or ``[B, T, 1, K]`` for the shared form (one q
    head and one k head read by all H heads of ``v``, ``f`` and ``W``).

    Raises ``ValueError`` naming the offending argument and what was expected.
    """
    named = {"q": q, "k": k, "v": v, "f": f, "W": W}
    if h0 is not None:
        named["h0"] = h0
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"m2rnn scan: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"m2rnn scan: {name} must be a floating-point tensor, got {x.dtype}")
    if q.dim() != 4:
        raise ValueError(f"m2rnn scan: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if min(B, T, H, K) < 1:
        raise ValueError(f"m2rnn scan: every dimension of q must be >= 1, got {tuple(q.shape)}")
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"m2rnn scan: k must have q's shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if H == 1 and v.dim() == 4:  # shared q/k: one q and one k head read by every v head
        H = v.shape[2]
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H) or v.shape[3] < 1:
        raise ValueError(f"m2rnn scan: v must be [B, T, H, V] = [{B}, {T}, {H}, V], "
                         f"got shape {tuple(v.shape)}")
    V = v.shape[3]
    if tuple(f.shape) != (B, T, H):
        raise ValueError(f"m2rnn scan: f must be [B, T, H] = {[B, T, H]}, got {tuple(f.shape)}")
    if tuple(W.shape) != (H, V, V):
        raise ValueError(f"m2rnn scan: W must be [H, V, V] = {[H, V, V]}, got {tuple(W.shape)}")
    if h0 is not None and tuple(h0.shape) != (B, H, K, V):
        raise ValueError(f"m2rnn scan: h0 must be [B, H, K, V] = {[B, H, K, V]}, "
                         f"got {tuple(h0.shape)}")
    devices = {name: x.device for name, x in named.items()}
    if len(set(devices.values())) != 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"m2rnn scan: all inputs must be on one device, got {listed}")
    return B, T, H, K, V

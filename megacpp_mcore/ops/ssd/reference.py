"""Mamba-2 SSD scan: a chunked plain-PyTorch reference (the CPU path of the M mixer).

Per head h the state ``S`` is a ``P x N`` matrix (P = head_dim, N = state_dim)::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (x) B_t        y_t = S_t C_t + D_h * x_t

Heads share B and C within a group. The chunked ("state space duality") form splits the
sequence into chunks of ``chunk_size``: inside a chunk the outputs are a masked, decayed
attention-like product (quadratic in the chunk length); the chunk-final states are passed
from chunk to chunk by a short recurrence. It is exact (no approximation), runs anywhere and
is differentiable by autograd; mamba-ssm's fused kernels compute the same function on GPU.
``ssd/naive.py`` is the step-by-step oracle; ``chunked_scan`` also carries Mamba-3's scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(log_decay[..., j+1 : i+1])`` for i >= j, else -inf.

    exp() of it is the decay from step j to step i inside one chunk.
    """
    length = log_decay.shape[-1]
    cumulative = torch.cumsum(log_decay, dim=-1)
    sums = cumulative[..., :, None] - cumulative[..., None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def chunked_scan(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked linear recurrence under SSD (and Mamba-3), per head::

        S_t = exp(log_decay_t) S_{t-1} + x_t (x) B_t        y_t = S_t C_t

    Args: ``x [b, l, h, p]`` (already scaled by its step), ``log_decay [b, l, h]``,
    ``B, C [b, l, h, n]`` (one per head), ``initial_state [b, h, p, n]`` or None; all of one
    dtype. ``l`` need not be a multiple of ``chunk_size`` (the tail is zero-padded, which
    leaves earlier outputs and the final state unchanged). Returns ``(y, final_state)``.
    """
    batch, length, heads, _ = x.shape
    pad = (-length) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
    chunks = x.shape[1] // chunk_size

    def chunked(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    xc, Bc, Cc = chunked(x), chunked(B), chunked(C)
    log_decay = chunked(log_decay).permute(0, 3, 1, 2)  # [b, h, c, l]
    log_cumulative = torch.cumsum(log_decay, dim=-1)

    # 1. outputs from inputs of the same chunk
    decay_within = torch.exp(_segment_sums(log_decay))  # [b, h, c, l, s]
    y_within = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay_within, xc)

    # 2. each chunk's contribution to the state at its end
    decay_to_end = torch.exp(log_cumulative[..., -1:] - log_cumulative)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xc)

    # 3. pass states across chunks
    if initial_state is None:
        initial_state = torch.zeros_like(chunk_states[:, 0])
    states = torch.cat([initial_state.to(x.dtype)[:, None], chunk_states], dim=1)
    chunk_log_decay = F.pad(log_cumulative[..., -1], (1, 0))  # [b, h, c + 1]
    decay_across = torch.exp(_segment_sums(chunk_log_decay))  # [b, h, c + 1, c + 1]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_across, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. outputs from the state entering each chunk
    y_across = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, entering, torch.exp(log_cumulative))

    y = (y_within + y_across).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    return y, final_state


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    Args:
        x: ``[b, l, h, p]`` inputs.
        dt: ``[b, l, h]`` step sizes, already positive (softplus and bias applied).
        A: ``[h]`` negative decay rates.
        B, C: ``[b, l, g, n]`` input/output projections; ``h`` must be a multiple of ``g``.
        chunk_size: chunk length; ``l`` need not be a multiple.
        D: ``[h]`` skip connection, or None.
        initial_state: ``[b, h, p, n]`` or None (zeros).

    Returns:
        ``(y [b, l, h, p], final_state [b, h, p, n])`` in float32 (float64 for float64 input).
    """
    heads, groups = x.shape[2], B.shape[2]
    if heads % groups:
        raise ValueError(f"heads ({heads}) must be a multiple of B/C groups ({groups})")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C = (t.to(compute) for t in (x, dt, A, B, C))
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    if initial_state is not None:
        initial_state = initial_state.to(compute)
    y, final_state = chunked_scan(x * dt[..., None], dt * A, B, C, chunk_size, initial_state)
    if D is not None:
        y = y + x * D.to(compute)[:, None]
    return y, final_state

"""The STP loss (Huang, LeCun, Balestriero, arXiv 2602.22617) written from its definition, one
sample at a time: the oracle of ``megacpp_mcore/stp.py``. Imports only torch.

A sample is a few positions of one sequence ``b`` of ``hidden [B, S, H]`` and its loss is one
minus a cosine:

* ``triple`` (the paper's form), indices ``(s, r, t)`` with ``s < r < t``:
  ``1 - cos(h[t] - h[r], h[r] - h[s])``, the step after ``r`` against the step before it;
* ``span`` (the released code's ``random_span``), indices ``(lo, a, b, hi)`` of a span
  ``[a, b]`` inside a document ``[lo, hi]``: ``1 - cos((h[a] - h[lo]) + (h[hi] - h[b]),
  h[b] - h[a])``, the rest of the trajectory's displacement against the span's.

The loss is the weighted mean over samples, ``sum(w * (1 - cos)) / max(sum(w), 1)``; a sample
of weight 0 is skipped (its indices need not mean anything). A zero vector has cosine 0.
"""

from __future__ import annotations

import torch

INDICES_PER_SAMPLE = {"triple": 3, "span": 4}


def _cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u . v / (|u| |v|)`` over the channels one by one; 0 when either vector is zero."""
    dot = sum(u[i] * v[i] for i in range(u.shape[0]))
    norm_u = torch.sqrt(sum(x * x for x in u))
    norm_v = torch.sqrt(sum(x * x for x in v))
    if norm_u == 0 or norm_v == 0:
        return dot * 0.0
    return dot / (norm_u * norm_v)


def naive_stp_loss(hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                   form: str) -> torch.Tensor:
    """The STP loss of ``hidden [B, S, H]`` over given samples, in ``hidden``'s dtype.

    ``indices [B, K, 3]`` (``triple``: s, r, t) or ``[B, K, 4]`` (``span``: lo, a, b, hi),
    ``weights [B, K]``. Differentiable in ``hidden``.
    """
    if form not in INDICES_PER_SAMPLE:
        raise ValueError(f"naive stp: unknown form {form!r}")
    if indices.shape[-1] != INDICES_PER_SAMPLE[form]:
        raise ValueError(f"naive stp: a {form} sample has {INDICES_PER_SAMPLE[form]} indices, "
                         f"got {indices.shape[-1]}")
    total = hidden.new_zeros(())
    weight_sum = 0.0
    for b in range(indices.shape[0]):
        for k in range(indices.shape[1]):
            w = float(weights[b, k])
            if w == 0.0:
                continue
            h = [hidden[b, int(i)] for i in indices[b, k]]
            if form == "triple":
                s, r, t = h
                u, v = t - r, r - s
            else:
                lo, a, end, hi = h
                u, v = (a - lo) + (hi - end), end - a
            total = total + w * (1.0 - _cosine(u, v))
            weight_sum += w
    return total / max(weight_sum, 1.0)

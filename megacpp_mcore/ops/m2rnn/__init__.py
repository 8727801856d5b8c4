"""The R mixer's scan: an M2RNN matrix-state recurrence.

Per batch ``b`` and head ``h`` the state is a ``K x V`` matrix (``K`` = k_head_dim,
``V`` = v_head_dim) and ``W`` is the head's ``V x V`` state matrix::

    pre_t = h_{t-1} @ W + outer(k_t, v_t)
    h_t   = f_t * h_{t-1} + (1 - f_t) * tanh(pre_t)      # f_t: one scalar per (b, t, head)
    y_t   = q_t^T h_t                                     # [V], a sum over the K rows

Shapes: ``q, k: [B, T, H, K]`` (or ``[B, T, 1, K]``: one q and one k head shared by every
head, broadcast without copies), ``v: [B, T, H, V]``, ``f: [B, T, H]``, ``W: [H, V, V]``,
``h0: [B, H, K, V]`` or None (zeros). Every path returns ``(y, h_last)`` with ``y: [B, T, H, V]``
in q's dtype and ``h_last: [B, H, K, V]`` in float32 (float64 when an input is float64).

Files (the scheme of ``megacpp_mcore/ops/__init__.py``):

* ``naive.py``: ``naive_m2rnn_scan``, the oracle (per step, per batch, per head);
* ``reference.py``: ``m2rnn_scan_reference``, plain PyTorch, any device (path ``reference``);
* ``fused.py``: ``m2rnn_scan_fused``, Triton kernels, CUDA only (path ``fused``);
* ``checks.py``: the input checks both paths share;
* ``dispatch.py``: ``m2rnn_scan(..., path=...)``, the one place a path is chosen.
"""

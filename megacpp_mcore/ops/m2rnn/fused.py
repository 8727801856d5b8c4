"""Fused Triton kernels for the M2RNN scan (forward and backward), behind one autograd op.

What it computes is documented in ``ops/m2rnn/__init__.py``; this module is the fast path.

Design:

* Row independence. Given ``W``, ``k``, ``v`` and ``f``, each of the K rows of a head's
  state evolves on its own: ``h[i] <- f h[i] + (1 - f) tanh(h[i] @ W + k[i] v)``. So a program
  owns a block of ``BK`` rows of one (batch, head) and keeps them in registers, in float32,
  for the whole sequence; the grid is (batch * head, row block). Only ``y = q^T h`` (a sum
  over rows) and the gradients of ``v``, ``f`` and ``W`` mix rows: each program writes its
  partial sums, and torch adds them in a fixed order. No atomics, so results are
  bitwise reproducible.
* Chunked recomputation for the backward. The forward stores the state only every
  ``backward_chunk`` steps. The backward walks the chunks in reverse: it recomputes the
  chunk's states from its boundary state into a per-program scratch buffer (reused by every
  chunk), then back-propagates through time over the chunk. Memory is linear in T with a
  small constant (boundaries: T / chunk states; scratch: 2 * chunk states per program),
  never a state per step.
* Matrix products ``h @ W`` use ``tl.dot`` in IEEE float32 (``input_precision="ieee"``, so
  no TF32) or, optionally, a broadcast-and-reduce; both need every dimension >= 16.
* tanh is computed from ``exp`` as ``sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)``
  (never overflows; absolute error a few float32 ulps), which runs everywhere, the Triton
  interpreter included.
* Inputs are loaded in their own dtype (bf16, fp16 or fp32) and upcast; the state and every
  accumulation are float32.

Shared q/k (``q, k: [B, T, 1, K]``, one q and one k head read by all H heads) is a
kernel argument (``HQ`` = 1): every program reads head 0 of q and k through its own
index, so no per-head copies of q or k are made; their gradients are written per head in
float32 and summed over heads by torch.

Supported: K (k_head_dim) in {16, 32, 64, 128, 256}, V (v_head_dim) in {16, 32, 64},
any B, T >= 1, any H, backward_chunk in [1, 1024]; q, k, v of one dtype in
{bf16, fp16, fp32}; f, W, h0 each in {bf16, fp16, fp32}. Anything else raises ValueError.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megacpp_mcore.ops.m2rnn.checks import SUPPORTED_K, SUPPORTED_V, check_scan_inputs

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_BACKWARD_CHUNK = 1024
# Largest [BK, V, V] intermediate the broadcast-and-reduce product may build per program.
MAX_BROADCAST_ELEMENTS = 16384
# Launch settings used where a ScanKernelConfig field is None, kept within what each shape
# allows (block rows at most K; broadcast products only where small enough).
# `scripts/bench_r_scan.py --apply` writes measured values here.
DEFAULT_BLOCK_ROWS = 16
DEFAULT_NUM_WARPS: int | None = None  # None: from the block size
DEFAULT_USE_DOT = True


@dataclass(frozen=True)
class ScanKernelConfig:
    """Launch settings of the fused scan (a tuning knob; results do not depend on them
    beyond float32 rounding of the cross-row sums).

    Attributes:
        block_rows: state rows per program (a power of two, 16 <= block_rows <= K);
            None means DEFAULT_BLOCK_ROWS (at most K).
        num_warps: warps per program; None means DEFAULT_NUM_WARPS, or picks from the
            block size.
        use_dot: tl.dot (IEEE float32) for the V x V products; False uses
            broadcast-and-reduce (only for small blocks); None means DEFAULT_USE_DOT (dot
            where the broadcast product would be too large).
    """

    block_rows: int | None = None
    num_warps: int | None = None
    use_dot: bool | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@triton.jit
def _tanh(x):
    # sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow for any x.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    # [M, N] @ [N, P] in float32.
    if USE_DOT:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return c


@triton.jit(do_not_specialize=["T", "NC", "CHUNK"])
def _m2rnn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, h0_ptr,
    ypart_ptr, hlast_ptr, bnd_ptr,
    T, H, HQ, NC, CHUNK,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, NR: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_BND: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Forward: one program = rows [pid_r * BK, (pid_r + 1) * BK) of one (batch, head).

    Writes this block's share of y (summed over row blocks by the caller), the last state
    and, for the backward, the state before every CHUNK-th step.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    b = pid_bh // H
    hh = pid_bh % H
    rows = pid_r * BK + tl.arange(0, BK)
    cols = tl.arange(0, V)
    w = tl.load(w_ptr + hh * V * V + cols[:, None] * V + cols[None, :]).to(tl.float32)
    st_off = pid_bh * K * V + rows[:, None] * V + cols[None, :]
    if HAS_H0:  # noqa: SIM108 (compile-time branch; keep Triton's plain if)
        h = tl.load(h0_ptr + st_off).to(tl.float32)
    else:
        h = tl.zeros([BK, V], dtype=tl.float32)
    bth0 = b * T * H + hh  # flat index of (b, t=0, hh) in [B, T, H]
    # q and k are [B, T, HQ, K]: HQ = H (per head) or 1 (shared: every head reads head 0).
    bq0 = b * T * HQ + hh % HQ

    # Inputs of step t are loaded one step ahead (software prefetch) to hide load latency.
    kt = tl.load(k_ptr + bq0 * K + rows).to(tl.float32)
    qt = tl.load(q_ptr + bq0 * K + rows).to(tl.float32)
    vt = tl.load(v_ptr + bth0 * V + cols).to(tl.float32)
    ft = tl.load(f_ptr + bth0).to(tl.float32)
    for t in range(T):
        nxt = bth0 + tl.minimum(t + 1, T - 1) * H
        nq = bq0 + tl.minimum(t + 1, T - 1) * HQ
        kn = tl.load(k_ptr + nq * K + rows).to(tl.float32)
        qn = tl.load(q_ptr + nq * K + rows).to(tl.float32)
        vn = tl.load(v_ptr + nxt * V + cols).to(tl.float32)
        fn = tl.load(f_ptr + nxt).to(tl.float32)
        if STORE_BND:  # noqa: SIM102 (compile-time test, then a runtime one)
            if t % CHUNK == 0:
                bnd_off = (pid_bh * NC + t // CHUNK) * K * V
                tl.store(bnd_ptr + bnd_off + rows[:, None] * V + cols[None, :], h)
        u = _tanh(_mm(h, w, USE_DOT) + kt[:, None] * vt[None, :])
        h = ft * h + (1.0 - ft) * u
        y_part = tl.sum(qt[:, None] * h, axis=0)
        cur = bth0 + t * H
        tl.store(ypart_ptr + (cur * NR + pid_r) * V + cols, y_part)
        kt = kn
        qt = qn
        vt = vn
        ft = fn
    tl.store(hlast_ptr + st_off, h)


@triton.jit(do_not_specialize=["T", "NC", "CHUNK"])
def _m2rnn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, dy_ptr, dhlast_ptr, bnd_ptr,
    hs_ptr, us_ptr,
    dq_ptr, dk_ptr, dvpart_ptr, dfpart_ptr, dwpart_ptr, dh0_ptr,
    T, H, HQ, NC, CHUNK,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, NR: tl.constexpr,
    HAS_H0: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Backward of one row block of one (batch, head), chunk by chunk in reverse.

    Per chunk: (1) recompute the states from the stored boundary state, keeping h_{t-1} and
    u_t = tanh(pre_t) in this program's scratch rows and writing dq_t = h_t dy_t; (2) walk the
    chunk backwards with G = dL/dh_t:
        G     += q_t dy_t^T
        df_t   = sum(G * (h_{t-1} - u_t))            (partial over this block's rows)
        dA     = (1 - f_t) G * (1 - u_t^2)
        dk_t   = dA v_t,  dv_t = dA^T k_t (partial),  dW += h_{t-1}^T dA (partial)
        G      = f_t G + dA W^T                      (= dL/dh_{t-1})
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    b = pid_bh // H
    hh = pid_bh % H
    rows = pid_r * BK + tl.arange(0, BK)
    cols = tl.arange(0, V)
    w_base = w_ptr + hh * V * V
    w = tl.load(w_base + cols[:, None] * V + cols[None, :]).to(tl.float32)
    wt = tl.load(w_base + cols[None, :] * V + cols[:, None]).to(tl.float32)  # W^T
    st_off = pid_bh * K * V + rows[:, None] * V + cols[None, :]
    g = tl.load(dhlast_ptr + st_off)
    dw = tl.zeros([V, V], dtype=tl.float32)
    bth0 = b * T * H + hh
    bq0 = b * T * HQ + hh % HQ  # q, k: [B, T, HQ, K]; dq, dk are written per head
    prog = pid_bh * NR + pid_r
    scr = prog * CHUNK * BK * V + tl.arange(0, BK)[:, None] * V + cols[None, :]

    for cc in range(NC):
        c = NC - 1 - cc
        t0 = c * CHUNK
        L = tl.minimum(CHUNK, T - t0)
        h = tl.load(bnd_ptr + (pid_bh * NC + c) * K * V + rows[:, None] * V + cols[None, :])

        # (1) Recompute the chunk's states; emit dq.
        cur = bth0 + t0 * H
        kt = tl.load(k_ptr + (bq0 + t0 * HQ) * K + rows).to(tl.float32)
        vt = tl.load(v_ptr + cur * V + cols).to(tl.float32)
        ft = tl.load(f_ptr + cur).to(tl.float32)
        dyt = tl.load(dy_ptr + cur * V + cols).to(tl.float32)
        for j in range(L):
            nxt = bth0 + (t0 + tl.minimum(j + 1, L - 1)) * H
            kn = tl.load(k_ptr + (bq0 + (t0 + tl.minimum(j + 1, L - 1)) * HQ) * K
                         + rows).to(tl.float32)
            vn = tl.load(v_ptr + nxt * V + cols).to(tl.float32)
            fn = tl.load(f_ptr + nxt).to(tl.float32)
            dyn = tl.load(dy_ptr + nxt * V + cols).to(tl.float32)
            tl.store(hs_ptr + scr + j * BK * V, h)
            u = _tanh(_mm(h, w, USE_DOT) + kt[:, None] * vt[None, :])
            tl.store(us_ptr + scr + j * BK * V, u)
            h = ft * h + (1.0 - ft) * u
            dq = tl.sum(h * dyt[None, :], axis=1)
            cur = bth0 + (t0 + j) * H
            tl.store(dq_ptr + cur * K + rows, dq.to(dq_ptr.dtype.element_ty))
            kt = kn
            vt = vn
            ft = fn
            dyt = dyn
        # Scratch written above is read below by other threads of this program.
        tl.debug_barrier()

        # (2) Back-propagate through the chunk, last step first.
        cur = bth0 + (t0 + L - 1) * H
        cq = bq0 + (t0 + L - 1) * HQ
        qt = tl.load(q_ptr + cq * K + rows).to(tl.float32)
        kt = tl.load(k_ptr + cq * K + rows).to(tl.float32)
        vt = tl.load(v_ptr + cur * V + cols).to(tl.float32)
        ft = tl.load(f_ptr + cur).to(tl.float32)
        dyt = tl.load(dy_ptr + cur * V + cols).to(tl.float32)
        hp = tl.load(hs_ptr + scr + (L - 1) * BK * V)
        u = tl.load(us_ptr + scr + (L - 1) * BK * V)
        for jj in range(L):
            j = L - 1 - jj
            jn = tl.maximum(j - 1, 0)
            nxt = bth0 + (t0 + jn) * H
            nq = bq0 + (t0 + jn) * HQ
            qn = tl.load(q_ptr + nq * K + rows).to(tl.float32)
            kn = tl.load(k_ptr + nq * K + rows).to(tl.float32)
            vn = tl.load(v_ptr + nxt * V + cols).to(tl.float32)
            fn = tl.load(f_ptr + nxt).to(tl.float32)
            dyn = tl.load(dy_ptr + nxt * V + cols).to(tl.float32)
            hpn = tl.load(hs_ptr + scr + jn * BK * V)
            un = tl.load(us_ptr + scr + jn * BK * V)

            cur = bth0 + (t0 + j) * H
            g = g + qt[:, None] * dyt[None, :]
            df_part = tl.sum(tl.sum(g * (hp - u), axis=1), axis=0)
            tl.store(dfpart_ptr + cur * NR + pid_r, df_part)
            da = (1.0 - ft) * g * (1.0 - u * u)
            dk = tl.sum(da * vt[None, :], axis=1)
            tl.store(dk_ptr + cur * K + rows, dk.to(dk_ptr.dtype.element_ty))
            dv_part = tl.sum(da * kt[:, None], axis=0)
            tl.store(dvpart_ptr + (cur * NR + pid_r) * V + cols, dv_part)
            dw += _mm(tl.trans(hp), da, USE_DOT)
            g = ft * g + _mm(da, wt, USE_DOT)

            qt = qn
            kt = kn
            vt = vn
            ft = fn
            dyt = dyn
            hp = hpn
            u = un
        # The next chunk overwrites the scratch rows read above.
        tl.debug_barrier()

    if HAS_H0:
        tl.store(dh0_ptr + st_off, g)
    tl.store(dwpart_ptr + prog * V * V + cols[:, None] * V + cols[None, :], dw)


def _resolve_config(K: int, V: int, config: ScanKernelConfig | None) -> tuple[int, int, bool]:
    config = config or ScanKernelConfig()
    bk = min(DEFAULT_BLOCK_ROWS, K) if config.block_rows is None else config.block_rows
    if bk < 16 or bk > K or bk & (bk - 1):
        raise ValueError(f"m2rnn fused scan: block_rows must be a power of two in [16, K={K}], "
                         f"got {bk}")
    use_dot = config.use_dot
    if use_dot is None:
        use_dot = DEFAULT_USE_DOT or bk * V * V > MAX_BROADCAST_ELEMENTS
    if not use_dot and bk * V * V > MAX_BROADCAST_ELEMENTS:
        raise ValueError(f"m2rnn fused scan: use_dot=False builds a [block_rows, V, V] = "
                         f"[{bk}, {V}, {V}] product per step; at most {MAX_BROADCAST_ELEMENTS} "
                         "elements are allowed, use use_dot=True or fewer block_rows")
    num_warps = DEFAULT_NUM_WARPS if config.num_warps is None else config.num_warps
    if num_warps is None:
        num_warps = max(1, min(8, bk * V // 256))
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"m2rnn fused scan: num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    return bk, num_warps, bool(use_dot)


def _check_fused_inputs(q, k, v, f, W, h0, backward_chunk) -> tuple[int, int, int, int, int]:
    B, T, H, K, V = check_scan_inputs(q, k, v, f, W, h0)
    if K not in SUPPORTED_K:
        raise ValueError(f"m2rnn fused scan: k_head_dim K={K} is not supported; "
                         f"supported: {SUPPORTED_K}")
    if V not in SUPPORTED_V:
        raise ValueError(f"m2rnn fused scan: v_head_dim V={V} is not supported; "
                         f"supported: {SUPPORTED_V}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"m2rnn fused scan: q, k, v must share one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    named = {"q": q, "f": f, "W": W} | ({} if h0 is None else {"h0": h0})
    for name, x in named.items():
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"m2rnn fused scan: {name} has dtype {x.dtype}; supported: "
                             "bfloat16, float16, float32 (use the reference path for float64)")
    if (isinstance(backward_chunk, bool) or not isinstance(backward_chunk, int)
            or not 1 <= backward_chunk <= MAX_BACKWARD_CHUNK):
        raise ValueError(f"m2rnn fused scan: backward_chunk must be an int in "
                         f"[1, {MAX_BACKWARD_CHUNK}], got {backward_chunk!r}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"m2rnn fused scan: needs CUDA tensors, got {q.device} "
                         "(use the reference path on CPU)")
    return B, T, H, K, V


def _device_guard(x: torch.Tensor):
    # Triton launches on torch's current CUDA device: make it the inputs' device.
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


class _M2RNNScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, f, W, h0, chunk, bk, num_warps, use_dot):
        B, T, HQ, K = q.shape
        H, V = v.shape[2], v.shape[-1]
        nr = K // bk
        nc = triton.cdiv(T, chunk)
        need_bwd = any(ctx.needs_input_grad[:6])
        fp32 = torch.float32
        ypart = torch.empty((B, T, H, nr, V), device=q.device, dtype=fp32)
        h_last = torch.empty((B, H, K, V), device=q.device, dtype=fp32)
        bnd = torch.empty((B, H, nc, K, V), device=q.device, dtype=fp32) if need_bwd else h_last
        with _device_guard(q):
            _m2rnn_fwd_kernel[(B * H, nr)](
                q, k, v, f, W, h_last if h0 is None else h0,
                ypart, h_last, bnd,
                T, H, HQ, nc, chunk,
                K=K, V=V, BK=bk, NR=nr,
                HAS_H0=h0 is not None, STORE_BND=need_bwd, USE_DOT=use_dot,
                num_warps=num_warps, num_stages=1,
            )
        y = ypart.sum(dim=3).to(q.dtype)
        if need_bwd:
            ctx.save_for_backward(q, k, v, f, W, bnd)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        ctx.launch = (chunk, bk, num_warps, use_dot)
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):
        q, k, v, f, W, bnd = ctx.saved_tensors
        chunk, bk, num_warps, use_dot = ctx.launch
        B, T, HQ, K = q.shape
        H, V = v.shape[2], v.shape[-1]
        nr = K // bk
        nc = triton.cdiv(T, chunk)
        fp32 = torch.float32
        dev = q.device
        dy = dy.contiguous()
        dh_last = dh_last.to(fp32).contiguous()
        # dq, dk are stored in the inputs' dtype (on GPU Triton rounds fp32 to nearest-even;
        # the CPU interpreter truncates, which only its bf16 runs would notice).
        # Shared q/k (HQ = 1): each head's dq, dk are written in float32 and summed over
        # heads below, in a fixed order (no atomics).
        shared = HQ != H
        dq = q.new_empty((B, T, H, K), dtype=fp32) if shared else torch.empty_like(q)
        dk = k.new_empty((B, T, H, K), dtype=fp32) if shared else torch.empty_like(k)
        dvpart = torch.empty((B, T, H, nr, V), device=dev, dtype=fp32)
        dfpart = torch.empty((B, T, H, nr), device=dev, dtype=fp32)
        dwpart = torch.empty((B, H, nr, V, V), device=dev, dtype=fp32)
        has_h0 = ctx.h0_dtype is not None
        dh0 = torch.empty((B, H, K, V), device=dev, dtype=fp32) if has_h0 else dwpart
        hs = torch.empty((B * H * nr, chunk, bk, V), device=dev, dtype=fp32)
        us = torch.empty_like(hs)
        with _device_guard(q):
            _m2rnn_bwd_kernel[(B * H, nr)](
                q, k, v, f, W, dy, dh_last, bnd,
                hs, us,
                dq, dk, dvpart, dfpart, dwpart, dh0,
                T, H, HQ, nc, chunk,
                K=K, V=V, BK=bk, NR=nr, HAS_H0=has_h0, USE_DOT=use_dot,
                num_warps=num_warps, num_stages=1,
            )
        if shared:
            dq = dq.sum(dim=2, keepdim=True).to(q.dtype)
            dk = dk.sum(dim=2, keepdim=True).to(k.dtype)
        dv = dvpart.sum(dim=3).to(v.dtype)
        df = dfpart.sum(dim=3).to(f.dtype)
        dW = dwpart.sum(dim=(0, 2)).to(W.dtype)
        dh0_out = dh0.to(ctx.h0_dtype) if has_h0 else None
        return dq, dk, dv, df, dW, dh0_out, None, None, None, None


def m2rnn_scan_fused(q, k, v, f, W, h0=None, backward_chunk=64, *, config=None):
    """The M2RNN scan as fused Triton kernels (forward + chunked-recomputation backward).

    Same contract as ``m2rnn_scan_reference``: returns ``y [B, T, H, V]`` in q's dtype and
    ``h_last [B, H, K, V]`` in float32. The forward keeps each program's block of state rows
    in registers (rows evolve independently given W, k, v, f) and stores the state only every
    ``backward_chunk`` steps; the backward recomputes each chunk from its stored state and
    back-propagates through it, so no per-step state is ever saved. Cross-row sums (y, dv,
    df, dW) are written as per-block partials and added by torch in a fixed order, so runs
    are bitwise deterministic. ``config`` (a ``ScanKernelConfig``) only tunes the launch.

    Needs CUDA tensors (or the Triton interpreter, ``TRITON_INTERPRET=1``, for CPU testing);
    the supported shapes and dtypes are listed in this module's docstring, and anything else
    raises ``ValueError``.
    """
    _, T, _, K, V = _check_fused_inputs(q, k, v, f, W, h0, backward_chunk)
    bk, num_warps, use_dot = _resolve_config(K, V, config)
    chunk = min(backward_chunk, T)
    q, k, v, f, W = (x.contiguous() for x in (q, k, v, f, W))
    if h0 is not None:
        h0 = h0.contiguous()
    return _M2RNNScanFn.apply(q, k, v, f, W, h0, chunk, bk, num_warps, use_dot)

#!/usr/bin/env python
"""Benchmark the R mixer's scan op on CUDA: fused Triton kernels vs the PyTorch reference.

Times forward + backward (``torch.autograd.grad`` of y and h_last) with
``triton.testing.do_bench`` (median) on bf16 inputs, B=1, T=4096, H in {16, 32}, K=64, V=16,
and prints ms, speedup and the peak memory above the inputs for each. ``--quick`` runs
fewer repetitions; ``--sweep`` also times the fused kernel's launch settings (rows per
program, warps, tl.dot or broadcast products) to pick the defaults.

    python scripts/bench_r_scan.py [--quick] [--sweep] [--T 4096] [--heads 16 32]

Imports nothing from Megatron.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.testing

from megacpp_mcore.ops.m2rnn_scan import m2rnn_scan_reference
from megacpp_mcore.ops.m2rnn_triton import (
    MAX_BROADCAST_ELEMENTS,
    ScanKernelConfig,
    m2rnn_scan_fused,
)


def make_inputs(B, T, H, K, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    bf16 = torch.bfloat16
    q = (randn(B, T, H, K) * 0.5).to(bf16)
    k = (randn(B, T, H, K) * 0.5).to(bf16)
    v = (randn(B, T, H, V) * 0.5).to(bf16)
    f = torch.sigmoid(randn(B, T, H) + 2).to(bf16)
    W = (torch.eye(V, device="cuda") + 0.02 * randn(H, V, V)).to(bf16)
    xs = [x.requires_grad_(True) for x in (q, k, v, f, W)]
    gy = randn(B, T, H, V).to(bf16)
    gh = randn(B, H, K, V)
    return xs, gy, gh


def fwd_bwd(fn, xs, gy, gh):
    y, h_last = fn(*xs)
    return torch.autograd.grad((y, h_last), xs, (gy, gh))


def fwd_only(fn, xs):
    with torch.no_grad():
        return fn(*xs)


def peak_mib(step) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def bench_ms(step, quick: bool, slow: bool = False) -> float:
    # do_bench sizes its loop from a first estimate; keep the slow reference to a few runs.
    warmup, rep = (5, 20) if quick else (25, 200)
    if slow:
        warmup, rep = 1, 1
    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def fused_configs(K: int, V: int, sweep: bool):
    configs = [("fused (default)", None)]
    if sweep:
        for bk in (16, 32, 64):
            for nw in (1, 2, 4):
                for dot in (True, False):
                    if bk > K or (not dot and bk * V * V > MAX_BROADCAST_ELEMENTS):
                        continue
                    name = f"fused bk={bk} warps={nw} {'dot' if dot else 'bcast'}"
                    configs.append((name, ScanKernelConfig(bk, nw, dot)))
    return configs


def bench_heads(H: int, args) -> list[tuple[str, float, float, float, float | None]]:
    """Rows (name, fwd ms, fwd+bwd ms, peak MiB, reference fwd+bwd ms) for one head count."""
    xs, gy, gh = make_inputs(1, args.T, H, args.K, args.V)
    rows = []
    for name, config in fused_configs(args.K, args.V, args.sweep):

        def fused(*x, config=config):
            return m2rnn_scan_fused(*x, backward_chunk=args.backward_chunk, config=config)

        fwd_bwd(fused, xs, gy, gh)  # compile
        ms_f = bench_ms(lambda fn=fused: fwd_only(fn, xs), args.quick)
        ms = bench_ms(lambda fn=fused: fwd_bwd(fn, xs, gy, gh), args.quick)
        mem = peak_mib(lambda fn=fused: fwd_bwd(fn, xs, gy, gh))
        rows.append((name, ms_f, ms, mem))
    ref_ms = None
    if not args.no_reference:
        ref = m2rnn_scan_reference
        ms_f = bench_ms(lambda: fwd_only(ref, xs), args.quick, slow=True)
        ref_ms = bench_ms(lambda: fwd_bwd(ref, xs, gy, gh), args.quick, slow=True)
        mem = peak_mib(lambda: fwd_bwd(ref, xs, gy, gh))
        rows.append(("reference (torch, fp32 compute)", ms_f, ref_ms, mem))
    return [(*row, ref_ms) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sweep", action="store_true", help="also sweep fused launch settings")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--V", type=int, default=16)
    parser.add_argument("--backward-chunk", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_r_scan: needs a CUDA GPU", file=sys.stderr)
        return 2

    B, T, K, V = 1, args.T, args.K, args.V
    chunk = args.backward_chunk
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"B={B} T={T} K={K} V={V} bf16 inputs, backward_chunk={chunk}, fwd+bwd median ms\n")
    header = (f"{'H':>3} {'path':<34} {'fwd ms':>8} {'fwd+bwd ms':>11} {'speedup':>8} "
              f"{'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for H in args.heads:
        for name, ms_f, ms, mem, ref_ms in bench_heads(H, args):
            speedup = f"{ref_ms / ms:7.1f}x" if ref_ms else f"{'-':>8}"
            print(f"{H:>3} {name:<34} {ms_f:8.3f} {ms:11.3f} {speedup:>8} {mem:9.1f}")
        state_mib = B * T * H * K * V * 4 / 2**20
        print(f"{'':>3} (one fp32 state per step would be {state_mib:.0f} MiB; "
              f"{math.ceil(T / chunk)} boundary states kept)\n")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

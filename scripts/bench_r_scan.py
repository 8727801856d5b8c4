#!/usr/bin/env python
"""Benchmark the R mixer's scan op on CUDA: fused Triton kernels vs the PyTorch reference,
and (``--sweep``) the fused kernel's launch settings, to pick ``ScanKernelConfig``'s defaults.

Times forward + backward (``torch.autograd.grad`` of y and h_last) with
``triton.testing.do_bench`` (median) on bf16 inputs, B=1, T=4096, H in {16, 32}, K=64, V=16,
and prints ms, speedup and the peak memory above the inputs for each. ``--quick`` runs
fewer repetitions. ``--sweep`` also times every launch setting (rows per program, warps,
tl.dot or broadcast products), prints the best one per shape and the best over all shapes
(smallest geometric mean of fwd+bwd time relative to the current default), and with
``--json PATH`` writes them down. ``--apply PATH`` then writes that overall best into the
launch defaults of ``megacpp_mcore/ops/m2rnn/fused.py`` (``DEFAULT_BLOCK_ROWS`` etc., used
where a ``ScanKernelConfig`` leaves a field None; no GPU needed):

    python scripts/bench_r_scan.py --sweep --quick --no-reference --json r_sweep.json  # GPU
    python scripts/bench_r_scan.py --apply r_sweep.json                               # here

Without CUDA, under the Triton interpreter (``TRITON_INTERPRET=1``), the same code runs on
CPU tensors at whatever (tiny) size is given, to check the sweep itself; its timings mean
nothing. Imports nothing from Megatron.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRITON_MODULE = ROOT / "megacpp_mcore" / "ops" / "m2rnn" / "fused.py"
WARPS = (1, 2, 4, 8)
BLOCK_ROWS = (16, 32, 64, 128)


# --------------------------------------------------------------------------- applying a result


def config_name(config: dict | None) -> str:
    if config is None:
        return "fused (default)"
    kind = "dot" if config["use_dot"] else "bcast"
    return f"fused bk={config['block_rows']} warps={config['num_warps']} {kind}"


def best_overall(per_shape: dict[str, dict[str, float]]) -> tuple[dict, float]:
    """The launch setting with the smallest geometric mean over shapes of its fwd+bwd time
    relative to the default's; ``per_shape``: shape -> {config json: ms} including
    ``"default"``. Only settings measured at every shape compete."""
    shapes = list(per_shape)
    candidates = set.intersection(*(set(per_shape[s]) for s in shapes)) - {"default"}
    if not candidates:
        raise ValueError("no launch setting was measured at every shape")

    def score(key: str) -> float:
        return math.exp(statistics.fmean(
            math.log(per_shape[s][key] / per_shape[s]["default"]) for s in shapes))

    best = min(sorted(candidates), key=score)
    return json.loads(best), score(best)


def apply_defaults(source: str, config: dict, note: str) -> str:
    """The module's launch defaults (``DEFAULT_BLOCK_ROWS``, ``DEFAULT_NUM_WARPS``,
    ``DEFAULT_USE_DOT``, used where a ``ScanKernelConfig`` field is None) set to ``config`` in
    ``source``, with a comment naming where the numbers came from. Refuses a source it does
    not recognise."""
    values = {
        "DEFAULT_BLOCK_ROWS": (r"DEFAULT_BLOCK_ROWS = [^\n]+", int(config["block_rows"])),
        "DEFAULT_NUM_WARPS": (r"DEFAULT_NUM_WARPS: int \| None = [^\n]+",
                              int(config["num_warps"])),
        "DEFAULT_USE_DOT": (r"DEFAULT_USE_DOT = [^\n]+", bool(config["use_dot"])),
    }
    for name, (pattern, value) in values.items():
        if len(re.findall(r"(?m)^" + pattern, source)) != 1:
            raise ValueError(f"{name}: its line was not found (is this ops/m2rnn/fused.py?)")
        annotation = ": int | None" if name == "DEFAULT_NUM_WARPS" else ""
        source = re.sub(r"(?m)^" + pattern, f"{name}{annotation} = {value!r}", source)
    source = re.sub(r"(?m)^# measured by scripts/bench_r_scan.py[^\n]*\n", "", source)
    return source.replace("\nDEFAULT_BLOCK_ROWS =", "\n# measured by scripts/bench_r_scan.py "
                          f"--sweep: {note}\nDEFAULT_BLOCK_ROWS =", 1)


def apply_file(result_path: Path, target: Path = TRITON_MODULE) -> dict:
    result = json.loads(Path(result_path).read_text())
    config = result["overall_best"]
    note = f"{result['device']}, T={result['T']} K={result['K']} V={result['V']}, " \
           f"heads {','.join(result['shapes'])} ({result['overall_relative']:.3f}x default)"
    target.write_text(apply_defaults(target.read_text(), config, note))
    return config


# --------------------------------------------------------------------------- measuring


def make_inputs(B, T, H, K, V, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = (randn(B, T, H, K) * 0.5).to(dtype)
    k = (randn(B, T, H, K) * 0.5).to(dtype)
    v = (randn(B, T, H, V) * 0.5).to(dtype)
    f = torch.sigmoid(randn(B, T, H) + 2).to(dtype)
    W = (torch.eye(V, device=device) + 0.02 * randn(H, V, V)).to(dtype)
    xs = [x.requires_grad_(True) for x in (q, k, v, f, W)]
    gy = randn(B, T, H, V).to(dtype)
    gh = randn(B, H, K, V)
    return xs, gy, gh


def fwd_bwd(fn, xs, gy, gh):
    import torch

    y, h_last = fn(*xs)
    return torch.autograd.grad((y, h_last), xs, (gy, gh))


def fwd_only(fn, xs):
    import torch

    with torch.no_grad():
        return fn(*xs)


def peak_mib(step, device) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def bench_ms(step, args, slow: bool = False) -> float:
    if args.device != "cuda":  # the interpreter: one run, only to prove it runs
        started = time.perf_counter()
        step()
        return (time.perf_counter() - started) * 1e3
    import triton.testing

    # do_bench sizes its loop from a first estimate; keep the slow reference to a few runs.
    warmup, rep = (5, 20) if args.quick else (25, 200)
    if slow:
        warmup, rep = 1, 1
    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def launch_configs(K: int, V: int, sweep: bool) -> list[dict | None]:
    """None (the current default) and, with ``sweep``, every valid launch setting."""
    from megacpp_mcore.ops.m2rnn.fused import MAX_BROADCAST_ELEMENTS

    configs: list[dict | None] = [None]
    if sweep:
        for bk in BLOCK_ROWS:
            for nw in WARPS:
                for dot in (True, False):
                    if bk > K or (not dot and bk * V * V > MAX_BROADCAST_ELEMENTS):
                        continue
                    configs.append({"block_rows": bk, "num_warps": nw, "use_dot": dot})
    return configs


def bench_heads(H: int, args) -> list[dict]:
    """One row per path for one head count: name, config, fwd ms, fwd+bwd ms, peak MiB."""
    from megacpp_mcore.ops.m2rnn.fused import ScanKernelConfig, m2rnn_scan_fused
    from megacpp_mcore.ops.m2rnn.reference import m2rnn_scan_reference

    xs, gy, gh = make_inputs(1, args.T, H, args.K, args.V, args.device)
    rows = []
    for config in launch_configs(args.K, args.V, args.sweep):
        kernel_config = None if config is None else ScanKernelConfig(**config)

        def fused(*x, kernel_config=kernel_config):
            return m2rnn_scan_fused(*x, backward_chunk=args.backward_chunk, config=kernel_config)

        try:
            fwd_bwd(fused, xs, gy, gh)  # compile
        except Exception as err:  # a launch setting the compiler refuses is a result too
            rows.append({"name": config_name(config), "config": config, "error": str(err)[:300]})
            continue
        rows.append({
            "name": config_name(config), "config": config,
            "fwd_ms": bench_ms(lambda fn=fused: fwd_only(fn, xs), args),
            "ms": bench_ms(lambda fn=fused: fwd_bwd(fn, xs, gy, gh), args),
            "peak_mib": peak_mib(lambda fn=fused: fwd_bwd(fn, xs, gy, gh), args.device),
        })
    if not args.no_reference:
        ref = m2rnn_scan_reference
        rows.append({
            "name": "reference (torch, fp32 compute)", "config": "reference",
            "fwd_ms": bench_ms(lambda: fwd_only(ref, xs), args, slow=True),
            "ms": bench_ms(lambda: fwd_bwd(ref, xs, gy, gh), args, slow=True),
            "peak_mib": peak_mib(lambda: fwd_bwd(ref, xs, gy, gh), args.device),
        })
    return rows


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


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
    parser.add_argument("--json", type=Path, help="write every row and the best settings here")
    parser.add_argument("--apply", type=Path, metavar="RESULT_JSON",
                        help="write a sweep's overall best into the launch defaults of "
                        "megacpp_mcore/ops/m2rnn/fused.py and exit; no GPU needed")
    args = parser.parse_args()
    if args.apply:
        config = apply_file(args.apply)
        print(f"launch defaults set to {config_name(config)} in "
              f"{TRITON_MODULE.relative_to(ROOT)}")
        return 0

    import torch
    import triton

    interpreting = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if torch.cuda.is_available():
        args.device = "cuda"
        device_name = torch.cuda.get_device_name()
    elif interpreting:
        args.device, device_name = "cpu", "cpu (Triton interpreter; timings mean nothing)"
    else:
        print("bench_r_scan: needs a CUDA GPU (or TRITON_INTERPRET=1 to check it on CPU)",
              file=sys.stderr)
        return 2

    B, T, K, V = 1, args.T, args.K, args.V
    chunk = args.backward_chunk
    print(f"{device_name}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"B={B} T={T} K={K} V={V} {'bf16' if args.device == 'cuda' else 'fp32'} inputs, "
          f"backward_chunk={chunk}, fwd+bwd median ms\n")
    header = (f"{'H':>3} {'path':<34} {'fwd ms':>8} {'fwd+bwd ms':>11} {'speedup':>8} "
              f"{'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    shapes, per_shape, best = {}, {}, {}
    for H in args.heads:
        rows = bench_heads(H, args)
        shapes[str(H)] = rows
        ref_ms = next((r["ms"] for r in rows if r["config"] == "reference"), None)
        for row in rows:
            if "error" in row:
                print(f"{H:>3} {row['name']:<34} failed: {row['error'][:60]}")
                continue
            speedup = f"{ref_ms / row['ms']:7.1f}x" if ref_ms else f"{'-':>8}"
            print(f"{H:>3} {row['name']:<34} {row['fwd_ms']:8.3f} {row['ms']:11.3f} "
                  f"{speedup:>8} {_cell(row['peak_mib'], '9.1f')}")
        fused = [r for r in rows if "error" not in r and r["config"] != "reference"]
        per_shape[str(H)] = {("default" if r["config"] is None else
                              json.dumps(r["config"], sort_keys=True)): r["ms"] for r in fused}
        if args.sweep:
            top = min((r for r in fused if r["config"] is not None), key=lambda r: r["ms"])
            default_ms = per_shape[str(H)]["default"]
            best[str(H)] = {**top["config"], "ms": top["ms"], "default_ms": default_ms}
            print(f"{'':>3} best for H={H}: {top['name']} {top['ms']:.3f} ms "
                  f"({top['ms'] / default_ms:.3f}x the default's {default_ms:.3f} ms)")
        state_mib = B * T * H * K * V * 4 / 2**20
        print(f"{'':>3} (one fp32 state per step would be {state_mib:.0f} MiB; "
              f"{math.ceil(T / chunk)} boundary states kept)\n")
        if args.device == "cuda":
            torch.cuda.empty_cache()
    result = {"device": device_name, "T": T, "K": K, "V": V, "backward_chunk": chunk,
              "shapes": shapes, "best": best}
    if args.sweep:
        overall, relative = best_overall(per_shape)
        result.update(overall_best=overall, overall_relative=relative)
        print(f"best over all shapes: {config_name(overall)} ({relative:.3f}x the default, "
              "geometric mean of fwd+bwd time)")
        if args.json:
            print(f"apply it with: python scripts/bench_r_scan.py --apply {args.json}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: forward+backward time and peak memory of one layer of each block family.

Run on the GPU machine (one GPU): ``python scripts/bench_layers.py --hidden 2048 4096``.
Each row builds a one-layer model of that family through ``build_model`` (bf16, backend
``te`` where Transformer Engine is installed, else ``local``), feeds a random
``[seq, batch, hidden]`` activation through its layer and times forward+backward with CUDA
events (median of ``--reps`` after ``--warmup``). The R layer is timed on both scan paths
(fused Triton kernel and the PyTorch reference) beside the M layer of the same hidden size,
in the same run. Prints a table and, with ``--json``, writes every number to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megacpp_mcore.backend import have_module, resolve_backend
from megacpp_mcore.distributed import init_process_groups, seed_everything
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.settings.config import (
    MambaConfig,
    ModelConfig,
    MoEConfig,
    PrecisionConfig,
    RecurrentConfig,
)


def layer_config(hidden: int, seq: int, r_heads: int) -> ModelConfig:
    """NAM56R's proportions at ``hidden`` (head dim 128, GQA 4:1, ffn 5.25 h)."""
    heads = hidden // 128
    return ModelConfig(
        hidden_size=hidden,
        ffn_hidden_size=hidden * 21 // 4,
        num_attention_heads=heads,
        num_query_groups=max(1, heads // 4),
        vocab_size=512,
        seq_length=seq,
        moe=MoEConfig(num_experts=16, top_k=4, ffn_hidden_size=896,
                      shared_expert_ffn_hidden_size=1024),
        mamba=MambaConfig(state_dim=128, head_dim=64, num_groups=8, chunk_size=128),
        recurrent=RecurrentConfig(num_heads=r_heads, k_head_dim=64, v_head_dim=16),
    )


def time_layer(layer, hidden_states, warmup: int, reps: int) -> tuple[float, int]:
    """Median fwd+bwd milliseconds and peak memory (bytes above the starting point)."""
    grad = torch.randn_like(hidden_states)

    def step():
        hidden_states.grad = None
        out = layer(hidden_states=hidden_states, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def bench_row(letter: str, path: str | None, hidden: int, args) -> dict:
    layout = parse_pattern(letter)
    config = layer_config(hidden, args.seq, args.r_heads)
    plan = resolve_backend(args.backend, layout, moe_dispatcher="alltoall")
    if path is not None:
        plan = plan.with_path(letter, path, "benchmark")
    seed_everything(1234)
    model = build_model(layout, config, plan=plan, precision=PrecisionConfig("bf16"))
    layer = model.decoder.layers[0]
    x = torch.randn(args.seq, args.batch, hidden, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    reps = args.reference_reps if path == "reference" else args.reps
    warmup = 1 if path == "reference" else args.warmup
    started = time.time()
    ms, peak = time_layer(layer, x, warmup, reps)
    family = plan.families[letter]
    row = {
        "letter": letter, "hidden": hidden, "seq": args.seq, "batch": args.batch,
        "built": family.built, "path": family.path, "ms": ms, "peak_mib": peak / 2**20,
        "params_m": sum(p.numel() for p in layer.parameters()) / 1e6,
        "wall_s": time.time() - started,
    }
    del model, layer, x
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--families", default="AEMFRG", help="letters to time")
    parser.add_argument("--r-heads", type=int, default=16, help="R heads (K=64, V=16)")
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--reference-reps", type=int, default=2,
                        help="repetitions of the (slow) R reference path; 0 skips it")
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_layers.py needs a CUDA GPU", file=sys.stderr)
        return 2
    init_process_groups(seed=1234)
    rows, skipped = [], []
    for hidden in args.hidden:
        for letter in args.families:
            if letter == "G" and not have_module("fla"):
                skipped.append("G: flash-linear-attention not installed")
                continue
            paths = [None]
            if letter == "R":
                paths = ["fused"] + (["reference"] if args.reference_reps > 0 else [])
            for path in paths:
                row = bench_row(letter, path, hidden, args)
                rows.append(row)
                print(f"  {letter} h={hidden} {row['path'] or ''}: {row['ms']:.2f} ms "
                      f"({row['wall_s']:.0f} s)", flush=True)

    device = torch.cuda.get_device_name()
    print(f"\none layer fwd+bwd, bf16, seq {args.seq} x batch {args.batch}, {device}")
    print(f"{'layer':<6}{'hidden':>7}  {'built':<6}{'path':<10}{'ms':>9}{'peak MiB':>10}"
          f"{'params M':>10}")
    for row in rows:
        print(f"{row['letter']:<6}{row['hidden']:>7}  {row['built']:<6}{row['path'] or '-':<10}"
              f"{row['ms']:>9.2f}{row['peak_mib']:>10.0f}{row['params_m']:>10.1f}")
    for hidden in args.hidden:
        by = {(r["letter"], r["path"]): r["ms"] for r in rows if r["hidden"] == hidden}
        fused, ref, mamba = by.get(("R", "fused")), by.get(("R", "reference")), by.get(
            ("M", "fused"))
        if fused and ref:
            print(f"h={hidden}: R fused is {ref / fused:.0f}x faster than the R reference")
        if fused and mamba:
            print(f"h={hidden}: R fused / M fused = {fused / mamba:.2f}")
    for note in skipped:
        print("skipped", note)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

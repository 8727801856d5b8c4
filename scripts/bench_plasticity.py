#!/usr/bin/env python3
"""Benchmark: what the plasticity tools cost.

Run on the GPU machine (one GPU): ``python scripts/bench_plasticity.py``.

1. FIRE wall time per matrix at NAM56R sizes (hidden 4096): attention-sized 4096x4096, the
   dense MLP's fc1 half 21504x4096 (and its fc2 4096x21504), one expert's 896x4096, ``exact``
   (SVD polar factor) and ``paper`` (5 Newton-Schulz steps), fp32 on the GPU, median of
   ``--reps``, with the worst singular-value error of the result.
2. DASH and ReDo cost per step on a mid-size model (``--hidden`` 2048, ``--pattern``
   AEMEAEMF, bf16, torch AdamW, micro-batch 2 x seq 2048): the median training step time with
   no hooks, the per-step observation cost (DASH's gradient EMA, ReDo's forward hooks and
   EMA) and the time of one intervention, then the amortised fraction of step time at the
   cadences ``--dash-every`` and ``--redo-every`` (target: under 0.5%).
Prints a table; ``--json PATH`` writes every number.
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

from megacpp_mcore.distributed import init_process_groups, seed_everything
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.plasticity.dash import DashHook
from megacpp_mcore.plasticity.fire import isometry
from megacpp_mcore.plasticity.redo import RedoHook
from megacpp_mcore.settings.config import (
    MambaConfig,
    ModelConfig,
    MoEConfig,
    PrecisionConfig,
    RecurrentConfig,
)
from megacpp_mcore.train.hooks import HookContext

FIRE_SHAPES = {"attention 4096x4096": (4096, 4096), "mlp fc1 half 21504x4096": (21504, 4096),
               "mlp fc2 4096x21504": (4096, 21504), "expert fc1 half 896x4096": (896, 4096)}


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_fire(reps: int) -> list[dict]:
    rows = []
    for name, shape in FIRE_SHAPES.items():
        w = torch.randn(*shape, device="cuda")
        scale = (shape[0] / shape[1]) ** 0.5
        for method in ("exact", "paper"):
            seconds = timed(lambda w=w, m=method: isometry(w, m), reps)
            singular = torch.linalg.svdvals(isometry(w, method))
            rows.append({"matrix": name, "method": method, "seconds": seconds,
                         "max_sv_error": float((singular - scale).abs().max())})
    return rows


def model_config(hidden: int, seq: int) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden, ffn_hidden_size=int(5.25 * hidden), num_attention_heads=hidden // 128,
        num_query_groups=max(1, hidden // 512), vocab_size=32768, seq_length=seq,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=hidden // 2, grouped_gemm=False),
        mamba=MambaConfig(state_dim=128, head_dim=64, num_groups=8),
        recurrent=RecurrentConfig(num_heads=hidden // 128, k_head_dim=64, v_head_dim=16),
    )


def bench_step_costs(args) -> dict:
    seed_everything(1234)
    model = build_model(parse_pattern(args.pattern), model_config(args.hidden, args.seq),
                        backend=args.backend, precision=PrecisionConfig(params_dtype="bf16"))
    model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32768, (2, args.seq + 1), generator=gen).cuda()
    positions = torch.arange(args.seq, device="cuda").expand(2, args.seq)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()
        optimizer.step()

    base = timed(step, args.reps, warmup=3)
    dash, redo = DashHook(every=args.dash_every), RedoHook(every=args.redo_every, tau=0.025)
    out = {"step_seconds": base}
    for hook in (dash, redo):
        hook.install([model], HookContext())

        def observed(hook=hook):
            step()
            hook.after_step(1, [model], optimizer)

        out[f"{hook.name}_observe_seconds"] = max(0.0, timed(observed, args.reps) - base)
        out[f"{hook.name}_act_seconds"] = timed(
            lambda hook=hook: hook.before_step(hook.start, [model], optimizer), 3)
        hook.remove()
        every = args.dash_every if hook.name == "dash" else args.redo_every
        out[f"{hook.name}_every"] = every
        out[f"{hook.name}_fraction"] = (out[f"{hook.name}_observe_seconds"]
                                        + out[f"{hook.name}_act_seconds"] / every) / base
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--pattern", default="AEMEAEMF")
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--dash-every", type=int, default=100)
    parser.add_argument("--redo-every", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_plasticity needs a CUDA GPU", file=sys.stderr)
        return 2
    init_process_groups(seed=1234)
    fire = bench_fire(args.reps)
    print(f"{'FIRE matrix':28} {'method':7} {'ms':>9} {'max |sv - scale|':>17}")
    for row in fire:
        print(f"{row['matrix']:28} {row['method']:7} {row['seconds'] * 1e3:9.1f} "
              f"{row['max_sv_error']:17.2e}")
    costs = bench_step_costs(args)
    print(f"\nstep ({args.pattern}, hidden {args.hidden}, 2 x {args.seq} tokens, bf16): "
          f"{costs['step_seconds'] * 1e3:.1f} ms")
    print(f"{'tool':6} {'every':>6} {'observe ms/step':>16} {'act ms':>9} {'amortised %':>12}")
    for tool in ("dash", "redo"):
        print(f"{tool:6} {costs[tool + '_every']:6d} {costs[tool + '_observe_seconds'] * 1e3:16.2f}"
              f" {costs[tool + '_act_seconds'] * 1e3:9.1f} {costs[tool + '_fraction'] * 100:12.3f}")
    if args.json:
        args.json.write_text(json.dumps({"fire": fire, "steps": costs, "args": vars(args)},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

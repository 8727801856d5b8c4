#!/usr/bin/env python3
"""Benchmark: the STP tax, tokens/s of training steps with STP on vs off in one process.

Run on the GPU machine (one GPU): ``python scripts/bench_stp.py`` (both models) or
``--models tiny``. For each model (``tiny``: the tiny recipe's sizes; ``mid``: hidden 2048,
8 layers ``AEMEAEMF``, seq 4096, micro-batch 2) it builds one bf16 model through
``build_model`` and alternates rounds of ``--steps`` training steps (forward, backward, AdamW
step) without the STP hook and with it installed (weight 0.1, gated on from the first step,
``--triples`` samples per sequence on the last decoder layer), timing each round after a
device synchronisation. Prints, per model, the median tokens/s of each mode and the tax
(1 - on/off, median of the per-round ratios; the target is under 2%).
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
from megacpp_mcore.settings.config import (
    MambaConfig,
    ModelConfig,
    MoEConfig,
    PrecisionConfig,
    StpConfig,
)
from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.stp import StpHook
from megacpp_mcore.train.hooks import HookContext


def mid_config() -> ModelConfig:
    return ModelConfig(
        hidden_size=2048, ffn_hidden_size=2048 * 21 // 4, num_attention_heads=16,
        num_query_groups=4, vocab_size=512, seq_length=4096,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=1024),
        mamba=MambaConfig(state_dim=128, head_dim=64, num_groups=8, chunk_size=128),
    )


def models(names: list[str]) -> list[tuple[str, str, ModelConfig, int]]:
    """(name, pattern, model settings, micro-batch size) for each requested model."""
    out = []
    for name in names:
        if name == "tiny":
            recipe = load_recipe("tiny")
            out.append(("tiny", recipe.layout.canonical, recipe.model,
                        recipe.training.micro_batch_size))
        elif name == "mid":
            out.append(("mid", "AEMEAEMF", mid_config(), 2))
        else:
            raise SystemExit(f"unknown model {name!r}; accepted: tiny, mid")
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_round(model, optimizer, tokens, positions, labels, steps: int, hook=None) -> float:
    """Tokens/s over ``steps`` training steps (synchronised before and after)."""
    _sync()
    started = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook.before_step(step + 1, [model], optimizer)
            hook.before_micro_batch({"tokens": tokens})
        model(tokens, positions, None, labels=labels).float().mean().backward()
        optimizer.step()
        if hook is not None:
            hook.metrics()  # what a loop reads once per step (one host sync)
    _sync()
    return steps * tokens.numel() / (time.perf_counter() - started)


def bench(name, pattern, config, micro, args) -> dict:
    seed_everything(1234)
    layout = parse_pattern(pattern)
    model = build_model(layout, config, backend=args.backend,
                        precision=PrecisionConfig(args.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (micro, config.seq_length + 1), generator=gen)
    data[:, config.seq_length // 3] = 256  # an end-of-document token
    data = data.to(args.device)
    tokens, labels = data[:, :-1], data[:, 1:]
    positions = torch.arange(config.seq_length, device=args.device).expand(micro, -1)
    stp = StpConfig(enabled=True, weight=0.1, start_step=1, triples=args.triples)
    run_round(model, optimizer, tokens, positions, labels, args.warmup)
    rounds = []
    for _ in range(args.rounds):
        off = run_round(model, optimizer, tokens, positions, labels, args.steps)
        hook = StpHook(stp, seed=1, eod_id=256)
        hook.install([model], HookContext(num_microbatches=1, layout=layout))
        run_round(model, optimizer, tokens, positions, labels, 1, hook)  # first-use warm-up
        on = run_round(model, optimizer, tokens, positions, labels, args.steps, hook)
        hook.remove()
        rounds.append({"off": off, "on": on, "tax": 1 - on / off})
    del model, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model": name, "pattern": pattern, "hidden": config.hidden_size,
            "seq": config.seq_length, "micro_batch": micro, "rounds": rounds,
            "off_median": statistics.median(r["off"] for r in rounds),
            "on_median": statistics.median(r["on"] for r in rounds),
            "tax_median": statistics.median(r["tax"] for r in rounds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--triples", type=int, default=64)
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of the harness only (fp32), not a measurement")
    args = parser.parse_args()
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_stp needs a CUDA GPU (or --device cpu for a smoke run)")
    init_process_groups(seed=1234)
    results = [bench(*spec, args) for spec in models(args.models)]
    print(f"{'model':<6} {'pattern':<10} {'hidden':>6} {'seq':>5} {'mb':>3} "
          f"{'off tok/s':>12} {'on tok/s':>12} {'tax':>7}  per-round tax")
    for r in results:
        per_round = " ".join(f"{x['tax'] * 100:+.2f}%" for x in r["rounds"])
        print(f"{r['model']:<6} {r['pattern']:<10} {r['hidden']:>6} {r['seq']:>5} "
              f"{r['micro_batch']:>3} {r['off_median']:>12,.0f} {r['on_median']:>12,.0f} "
              f"{r['tax_median'] * 100:>6.2f}%  {per_round}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

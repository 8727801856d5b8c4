"""``megacpp bench``: native Megatron against the plugin, same model, one process, one GPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from megacpp_mcore.cli.recipe import add_set_argument
from megacpp_mcore.errors import BenchError
from megacpp_mcore.jsonio import atomic_write_json, jsonable
from megacpp_mcore.train.bench_report import MAIN_RUNS

#: --quick: 5 rounds x (5 warm-up + 15 timed), families 2 rounds; a few minutes on an H200.
QUICK = dict(rounds=5, warmup=5, steps=15, family_rounds=2, profile_steps=2)
FULL = dict(rounds=5, warmup=10, steps=30, family_rounds=3, profile_steps=3)


def _tuned_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--tuned-config {item!r}: expected FIELD=VALUE (a Megatron "
                             "TransformerConfig field, e.g. moe_permute_fusion=true)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def settings_from_args(args: argparse.Namespace):
    """The bench settings: --quick or full defaults, then every flag given explicitly."""
    base = dict(QUICK if args.quick else FULL)
    for key in ("rounds", "warmup", "steps", "family_rounds", "profile_steps"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    from megatron.core.transformer import TransformerConfig

    from megacpp_mcore.train.bench import BenchSettings

    tuned = _tuned_config(args.tuned_config)
    unknown = sorted(set(tuned) - set(TransformerConfig.__dataclass_fields__))
    if unknown:
        raise BenchError(f"--tuned-config: {unknown} are not Megatron TransformerConfig fields")
    return BenchSettings(
        runs=tuple(r.strip() for r in args.runs.split(",") if r.strip()),
        families=args.families,
        family_depth=args.family_depth,
        router_fusion=not args.no_router_fusion,
        cuda_graphs=args.cuda_graphs,
        tuned_micro_batch=args.tuned_micro_batch,
        tuned_config=tuned,
        tuned_sets=tuple(args.tuned_set),
        loss_tol=args.loss_tol,
        token_loss_tol=args.token_loss_tol,
        peak_tflops=args.peak_tflops,
        backend=args.backend,
        seed=args.seed,
        budget_s=args.budget_s if args.budget_s is not None else float("inf"),
        **base,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from megacpp_mcore.settings.recipe import load_recipe
    from megacpp_mcore.train.bench import render, run_bench

    sets = list(args.set)
    if args.pattern:
        sets.append(f"pattern={args.pattern}")
    if args.depth is not None:
        sets.append(f"depth={args.depth}")
    recipe = load_recipe(args.recipe, sets)
    settings = settings_from_args(args)
    tuned_model = None
    if args.tuned_set:
        tuned = load_recipe(args.recipe, [*sets, *args.tuned_set])
        if tuned.layout != recipe.layout or tuned.precision != recipe.precision or \
                tuned.training != recipe.training or tuned.parallel != recipe.parallel:
            raise BenchError("--tuned-set: only model.* settings may differ between the "
                             f"plugin_tuned run and the others; got {args.tuned_set}")
        tuned_model = tuned.model
    parallel = recipe.parallel
    if (parallel.tensor, parallel.pipeline, parallel.expert, parallel.context) != (1, 1, 1, 1):
        raise BenchError(f"{recipe.where}: megacpp bench runs one process on one GPU; the "
                         "recipe asks for parallel sizes other than 1 (set parallel.* to 1)")
    if recipe.layout.mtp or len(recipe.layout.stages) > 1:
        raise BenchError(f"{recipe.where}: megacpp bench times one stage without MTP; the "
                         f"pattern {recipe.pattern!r} has '|' or '/'")

    import torch

    if not torch.cuda.is_available():  # before any process group exists
        raise BenchError("megacpp bench times training steps on a CUDA GPU and none is "
                         "visible here (the CPU tests cover its building, weight mapping and "
                         "loss check)")
    from megacpp_mcore.distributed import destroy_process_groups, init_process_groups

    init_process_groups(seed=settings.seed)
    try:
        report = run_bench(recipe.layout, recipe.model, recipe.precision,
                           recipe.training.micro_batch_size, settings, tuned_model=tuned_model)
    finally:
        destroy_process_groups()
    from megacpp_mcore.receipt.writer import collect_versions

    report.update(kind="megacpp-bench", recipe=recipe.to_dict(), recipe_hash=recipe.recipe_hash,
                  versions=collect_versions())
    print(render(report))
    if args.json:
        atomic_write_json(Path(args.json), jsonable(report))
        print(f"\nreport: {args.json}")
    elif args.print_json:
        print(json.dumps(jsonable(report), indent=1))
    failed = [c for c in report["loss_checks"] if not c["passed"] and not c["skipped"]]
    return 1 if failed or report["errors"] else 0


def add_bench_subcommand(sub: argparse._SubParsersAction) -> None:
    """Register ``megacpp bench``."""
    p = sub.add_parser(
        "bench",
        help="time native Megatron against the plugin on the same model (one GPU)",
        description="Build the recipe's model twice in one process on one GPU, natively "
        "(Megatron's HybridModel with its TE hybrid_stack_spec) and with the plugin "
        "(build_model, backend te), give both the same weights and check they give the same "
        "per-token losses, then alternate them round by round and print step time, tokens/s, "
        "model TFLOP/s, MFU, host-issue vs GPU time, peak memory, per-round ratios with their "
        "spread, and one-family rows. A pattern with R is timed plugin-only, with R's share "
        "of the step. Needs CUDA; exits 1 if a loss check fails or a run errors.",
    )
    p.add_argument("recipe", nargs="?", default="bench_hybrid",
                   help="a recipe name or YAML path (default bench_hybrid)")
    add_set_argument(p)
    p.add_argument("--pattern", help="override the recipe's pattern (e.g. AEMEAEMEAEMR)")
    p.add_argument("--depth", type=int, help="override the recipe's depth")
    p.add_argument("--quick", action="store_true",
                   help="5 rounds x (5 warm-up + 15 timed), family rows 2 rounds (default "
                   "5 x (10 + 30), 3)")
    p.add_argument("--rounds", type=int, help="alternating rounds of the main runs")
    p.add_argument("--warmup", type=int, help="warm-up steps per run per round")
    p.add_argument("--steps", type=int, help="timed steps per run per round")
    p.add_argument("--runs", default=",".join(MAIN_RUNS),
                   help=f"comma list of {', '.join(MAIN_RUNS)} (native is always built: it "
                   "lends its weights)")
    p.add_argument("--families", default="AEMF",
                   help="letters timed as one-family models, native vs plugin ('' none; R "
                   "plugin-only)")
    p.add_argument("--family-depth", type=int, default=8, help="layers of a family model")
    p.add_argument("--family-rounds", type=int, help="alternating rounds per family")
    p.add_argument("--no-router-fusion", action="store_true",
                   help="tuned runs without moe_router_fusion")
    p.add_argument("--cuda-graphs", default="",
                   help="tuned runs capture TE CUDA graphs of these cuda_graph_modules, e.g. "
                   "attn,mamba,moe_router,moe_preprocess (default none)")
    p.add_argument("--tuned-micro-batch", type=int, help="micro-batch of the tuned runs")
    p.add_argument("--tuned-config", action="append", default=[], metavar="FIELD=VALUE",
                   help="a further TransformerConfig field for the tuned runs (repeatable)")
    p.add_argument("--tuned-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe setting of plugin_tuned only (repeatable; the plugin's own "
                   "model.* settings native cannot take, e.g. model.moe.expert_gemm=torch); "
                   "with it, every family row also times plugin_tuned")
    p.add_argument("--loss-tol", type=float, default=0.02,
                   help="largest |mean loss difference| from native, nats (default 0.02)")
    p.add_argument("--token-loss-tol", type=float, default=0.1,
                   help="largest mean |per-token loss difference| from native (default 0.1)")
    p.add_argument("--profile-steps", type=int,
                   help="steps profiled per run for GPU busy time (0: none)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense BF16 peak for MFU")
    p.add_argument("--backend", choices=("te", "auto", "local"), default="te",
                   help="the plugin's backend (default te)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--budget-s", type=float,
                   help="start no new round or family after this many seconds (the report "
                   "is still printed); e.g. 420 inside a 10-minute job")
    p.add_argument("--json", metavar="PATH", help="write the report (JSON) here")
    p.add_argument("--print-json", action="store_true", help="also print the JSON report")
    p.set_defaults(handler=_cmd_bench)

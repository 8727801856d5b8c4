"""``megacpp train RECIPE``: the project's main job.

On a machine with a CUDA GPU it translates the recipe for the plugin target and runs
Megatron's ``pretrain`` through ``scripts/pretrain_nam.py`` under torchrun (``launcher.py``);
on a CPU-only machine it runs the CPU path (``cpu_train.py``: the same model, data and
receipt, a plain PyTorch optimizer), and says so. Either way it prints progress and ends with
where the receipt is and a short summary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from megacpp_mcore.errors import MegacppError
from megacpp_mcore.paths import REPO_ROOT
from megacpp_mcore.receipt import Receipt, load_receipt

LAUNCHER = REPO_ROOT / "scripts" / "pretrain_nam.py"


def gpu_command(recipe, nproc: int | None, receipt: Path | None,
                megatron_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and environment for the GPU path."""
    from megacpp_mcore.megatron.translate import translate

    plan = translate(recipe, "plugin")
    argv = plan.argv()
    if receipt is not None:
        argv += ["--megacpp-receipt", str(receipt)]
    env = dict(os.environ)
    for var in plan.env:
        if var.value is None:
            env.pop(var.name, None)
        else:
            env[var.name] = var.value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc or plan.nproc}", str(LAUNCHER), *argv,
               *megatron_args]
    return command, env


def summary(receipt: Receipt) -> str:
    """A few lines on how the run went."""
    intervals = receipt.intervals
    if not intervals:
        return f"receipt {receipt.path}: no interval logged ({receipt.data['run']['status']})"
    first, last = intervals[0], intervals[-1]
    after = receipt.post_warmup() or intervals
    speed = sum(iv.get("tokens_per_s") or 0 for iv in after) / len(after)
    path = receipt.data.get("model", {}).get("training_path", "")
    return "\n".join([
        f"receipt: {receipt.path}",
        f"  {receipt.data['recipe']['name']} {receipt.data['pattern']['pattern']}, {path}",
        f"  status {receipt.data['run']['status']}; steps {first['step']}..{last['step']}; "
        f"loss {_number(first['loss'])} -> {_number(last['loss'])}",
        f"  {speed:,.0f} tokens/s after warm-up",
    ])


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _newest_receipt(folder: Path, since: float) -> Receipt | None:
    found = [p for p in folder.glob("*.json") if p.stat().st_mtime >= since]
    return load_receipt(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    import torch

    from megacpp_mcore.settings.recipe import load_recipe

    overrides = list(args.set)
    if args.train_iters:  # the whole schedule follows, as Megatron's --train-iters would
        overrides.append(f"training.train_iters={args.train_iters}")
    recipe = load_recipe(args.recipe, overrides)
    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    receipt_path = Path(args.receipt) if args.receipt else None
    if device == "cpu":
        if args.megatron_args:
            raise MegacppError("Megatron flags after '--' apply to the GPU path only")
        print("no CUDA GPU: training on the CPU path (same model, data and receipt; a plain "
              "PyTorch optimizer instead of Megatron's pretrain, which requires CUDA)"
              if args.device is None else "training on the CPU path", flush=True)
        from megacpp_mcore.features import build_training_hooks
        from megacpp_mcore.train.cpu_loop import train_on_cpu

        receipt = train_on_cpu(recipe, receipt_path=receipt_path,
                               hooks=build_training_hooks(recipe))
        print(summary(receipt))
        return 0
    command, env = gpu_command(recipe, args.nproc, receipt_path, list(args.megatron_args))
    print("running:", " ".join(command), flush=True)
    started = time.time()
    result = subprocess.run(command, env=env, check=False)
    folder = receipt_path if receipt_path and receipt_path.is_dir() else (
        receipt_path.parent if receipt_path else Path(recipe.logging.receipt_dir))
    receipt = load_receipt(receipt_path) if receipt_path and receipt_path.is_file() else (
        _newest_receipt(folder, started))
    if receipt is not None:
        print(summary(receipt))
    return result.returncode


def add_train_subcommand(sub: argparse._SubParsersAction) -> None:
    from megacpp_mcore.cli.recipe import add_set_argument

    p = sub.add_parser(
        "train",
        help="train a recipe (Megatron pretrain on GPU; the CPU path without one)",
        description="Train RECIPE. With a CUDA GPU: Megatron-LM's pretrain under torchrun with "
        "the plugin's flags (megacpp translate --target plugin). Without one: the CPU path "
        "(same model, data and receipt; a plain PyTorch optimizer). Prints progress and the "
        "receipt. Flags after '--' go to Megatron unchanged (e.g. -- --save DIR --load DIR).",
    )
    p.add_argument("recipe", help="a recipe name (tiny) or path (recipes/tiny.yaml)")
    add_set_argument(p)
    p.add_argument("--device", choices=["gpu", "cpu"], default=None,
                   help="force a path (default: gpu when CUDA is available)")
    p.add_argument("--nproc", type=int, default=None,
                   help="GPU processes (default: the smallest world the parallel sizes fit)")
    p.add_argument("--train-iters", type=int, default=None, help="override the step count")
    p.add_argument("--receipt", default=None,
                   help="receipt file (or folder ending in /); default logging.receipt_dir")
    p.set_defaults(handler=_cmd_train, megatron_args=[], accepts_passthrough=True)

"""``megacpp train RECIPE``: the project's main job.

On a machine with a CUDA GPU it translates the recipe for the plugin target and runs
Megatron's ``pretrain`` through ``scripts/pretrain_nam.py`` under torchrun
(``megatron/launcher.py``); on a CPU-only machine it runs the CPU path (``train/cpu_loop.py``:
the same model, data and receipt, a plain PyTorch optimizer), and says so. Either way it
prints progress and ends with where the receipt is and a short summary. Ctrl-C and SIGTERM
end the run cleanly: the receipt says ``interrupted`` or ``terminated``, no traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from megacpp_mcore.errors import MegacppError
from megacpp_mcore.jsonio import number
from megacpp_mcore.paths import REPO_ROOT
from megacpp_mcore.receipt import (
    Receipt,
    Terminated,
    load_receipt,
    receipt_destination,
    sigterm_raises,
)

LAUNCHER = REPO_ROOT / "scripts" / "pretrain_nam.py"


def gpu_command(recipe, nproc: int | None, receipt: str | Path | None,
                megatron_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and environment for the GPU path (``receipt`` as the user
    wrote it: a trailing '/' means a folder to the launcher)."""
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
    """A few lines on how the run went (any valid receipt: a NaN loss, no pattern)."""
    data = receipt.data
    intervals = receipt.intervals
    if not intervals:
        return f"receipt {receipt.path}: no interval logged ({data['run']['status']})"
    first, last = intervals[0], intervals[-1]
    after = receipt.post_warmup() or intervals
    speeds = [number(iv.get("tokens_per_s")) or 0.0 for iv in after]
    path = (data.get("model") or {}).get("training_path", "")
    pattern = (data.get("pattern") or {}).get("pattern") or "-"
    return "\n".join([
        f"receipt: {receipt.path}",
        f"  {data['recipe'].get('name') or '-'} {pattern}, {path}",
        f"  status {data['run']['status']}; steps {first['step']}..{last['step']}; "
        f"loss {_number(first.get('loss'))} -> {_number(last.get('loss'))}",
        f"  {sum(speeds) / len(speeds):,.0f} tokens/s after warm-up",
    ])


def _number(value) -> str:
    value = number(value)
    return "-" if value is None else f"{value:.4f}"


def _newest_receipt(folder: Path, since: float) -> Receipt | None:
    found = [p for p in folder.glob("*.json") if p.stat().st_mtime >= since]
    return load_receipt(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    import torch

    from megacpp_mcore.settings.recipe import load_recipe

    overrides = list(args.set)
    if args.train_iters is not None:  # the whole schedule follows, as Megatron's would
        overrides.append(f"training.train_iters={args.train_iters}")
    recipe = load_recipe(args.recipe, overrides)
    if args.device == "gpu" and not torch.cuda.is_available():
        raise MegacppError(
            f"--device gpu: torch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}); run on a machine with a CUDA GPU and a CUDA "
            "build of torch, or use --device cpu")
    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    receipt_file, receipt_dir = (receipt_destination(args.receipt) if args.receipt is not None
                                 else (None, None))
    if device == "cpu":
        if args.megatron_args:
            raise MegacppError("Megatron flags after '--' apply to the GPU path only")
        print("no CUDA GPU: training on the CPU path (same model, data and receipt; a plain "
              "PyTorch optimizer instead of Megatron's pretrain, which requires CUDA)"
              if args.device is None else "training on the CPU path", flush=True)
        from megacpp_mcore.features import build_training_hooks
        from megacpp_mcore.train.cpu_loop import train_on_cpu

        receipt = train_on_cpu(recipe, receipt_path=receipt_file, receipt_dir=receipt_dir,
                               hooks=build_training_hooks(recipe))
        print(summary(receipt))
        return 0
    command, env = gpu_command(recipe, args.nproc, args.receipt, list(args.megatron_args))
    print("running:", " ".join(command), flush=True)
    started = time.time()
    returncode = _run_forwarding_stops(command, env)
    folder = receipt_dir or (receipt_file.parent if receipt_file else
                             Path(recipe.logging.receipt_dir))
    receipt = load_receipt(receipt_file) if receipt_file and receipt_file.is_file() else (
        _newest_receipt(folder, started) if folder.is_dir() else None)
    if receipt is not None:
        print(summary(receipt))
    return returncode


def _run_forwarding_stops(command: list[str], env: dict[str, str]) -> int:
    """Run the launcher; on Ctrl-C or SIGTERM give its ranks time to end their receipts.

    Ctrl-C reaches the launcher itself (same terminal process group); SIGTERM to this
    process is passed on. Either way the stop is re-raised once the launcher has exited."""
    proc = subprocess.Popen(command, env=env)
    try:
        with sigterm_raises():
            return proc.wait()
    except (KeyboardInterrupt, Terminated) as stop:
        if isinstance(stop, Terminated) and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 and negatives are refused, never ignored)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


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
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="GPU processes (default: the smallest world the parallel sizes fit)")
    p.add_argument("--train-iters", type=positive_int, default=None,
                   help="override the step count (>= 1)")
    p.add_argument("--receipt", default=None,
                   help="receipt file, or a folder (ending in / or existing) to write "
                   "<run-id>.json into; default logging.receipt_dir")
    p.set_defaults(handler=_cmd_train, megatron_args=[], accepts_passthrough=True)

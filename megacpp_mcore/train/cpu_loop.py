"""The CPU training path: the same model, data and receipts as the GPU launcher, with a plain
PyTorch optimizer, because Megatron's ``pretrain`` (its optimizers and DDP wrapper) requires
CUDA. The receipt says which path ran.

What is the same as on GPU: ``build_model`` (the recipe's layout and sizes, the backend
dispatcher's record), the data (the embedded corpus or an indexed dataset, byte tokens, fixed
windows), the loss (mean token cross-entropy over the global batch, MoE aux losses through
Megatron's autoscaler, scaled per micro-batch as Megatron's schedule does), the LR schedule
(linear warm-up, then the recipe's decay to ``min_lr``), gradient clipping and the receipt.
What differs: torch AdamW on fp32 parameters instead of Megatron's distributed optimizer, a
single process (data-parallel size 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from megacpp_mcore.backend import receipt_backends
from megacpp_mcore.errors import DataError
from megacpp_mcore.receipt import Receipt
from megacpp_mcore.settings.config import TrainingConfig
from megacpp_mcore.settings.recipe import Recipe
from megacpp_mcore.train.data import TokenWindows, prepare_embedded
from megacpp_mcore.train.flops import model_flops_per_token
from megacpp_mcore.train.hooks import HookContext, HookList
from megacpp_mcore.train.meter import IntervalMeter, moe_aux_losses

TRAINING_PATH = "cpu: torch AdamW over the Megatron model (Megatron's pretrain needs CUDA)"


def lr_at(step: int, training: TrainingConfig) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up, then decay to min_lr."""
    if step < training.lr_warmup_iters:
        return training.lr * (step + 1) / training.lr_warmup_iters
    span = max(1, training.train_iters - training.lr_warmup_iters)
    progress = min(1.0, (step - training.lr_warmup_iters) / span)
    if training.lr_decay_style == "constant":
        return training.lr
    if training.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return training.min_lr + (training.lr - training.min_lr) * factor


def token_source(recipe: Recipe) -> Path | np.ndarray:
    """The recipe's data: the embedded corpus, an indexed dataset, or mock tokens."""
    data = recipe.data
    if data.source == "embedded":
        return prepare_embedded()
    if data.source == "path":
        if len(data.paths) != 1:
            raise DataError(f"the CPU path trains on one indexed dataset, got data.paths = "
                            f"{list(data.paths)}")
        return Path(data.paths[0])
    rng = np.random.default_rng(recipe.training.seed)
    return rng.integers(0, recipe.model.vocab_size, size=1 << 16)


def _optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norm weights excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": training.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=training.lr,
                             betas=(training.adam_beta1, training.adam_beta2))


def train_on_cpu(
    recipe: Recipe,
    *,
    receipt_path: Path | None = None,
    train_iters: int | None = None,
    print_fn: Callable[[str], None] | None = print,
    hooks: HookList | None = None,
) -> Receipt:
    """Train ``recipe`` on the CPU; returns the (finished) receipt.

    ``hooks``: the run's training hooks (:mod:`megacpp_mcore.train.hooks`), built from the
    recipe by :func:`megacpp_mcore.features.build_training_hooks`; called at the same points
    of an iteration as on the Megatron path.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.model import build_model

    training = recipe.training
    steps = train_iters or training.train_iters
    if training.global_batch_size % training.micro_batch_size:
        raise DataError("training.global_batch_size must be a multiple of micro_batch_size")
    micro_batches = training.global_batch_size // training.micro_batch_size
    init_process_groups(seed=training.seed)
    layout = recipe.layout
    model = build_model(layout, recipe.model, backend=recipe.backend,
                        precision=recipe.precision)
    windows = TokenWindows(token_source(recipe), training.micro_batch_size,
                           recipe.model.seq_length, seed=training.seed)
    seq = recipe.model.seq_length
    positions = torch.arange(seq).expand(training.micro_batch_size, seq)
    optimizer = _optimizer(model, training)
    hooks = hooks if hooks is not None else HookList()
    hooks.install([model], HookContext(num_microbatches=micro_batches, path="cpu",
                                       layout=layout))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / micro_batches))

    receipt = Receipt.create(
        receipt_path,
        receipt_dir=recipe.logging.receipt_dir,
        recipe_name=recipe.name,
        recipe_hash=recipe.recipe_hash,
        layout=layout,
        backends=receipt_backends(model.backend_record),
        parallel={"tensor": 1, "pipeline": 1, "expert": 1, "context": 1, "data": 1},
        model={"flops_per_token": model_flops_per_token(layout, recipe.model),
               "peak_tflops": None, "training_path": TRAINING_PATH},
        notes={"train_iters": steps, "micro_batches_per_step": micro_batches,
               "training_hooks": [hook.name for hook in hooks]},
    )
    meter = IntervalMeter(
        receipt,
        tokens_per_step=training.global_batch_size * seq,
        flops_per_token=receipt.data["model"]["flops_per_token"],
        num_gpus=1,
        peak_tflops=None,
        log_interval=training.log_interval,
        print_fn=print_fn,
    )
    if print_fn is not None:
        print_fn(f"training {recipe.name} ({layout.canonical}) on the CPU for {steps} steps; "
                 f"receipt: {receipt.path}")
    with receipt.guard():
        for step in range(steps):
            lr = lr_at(step, training)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            hooks.before_step(step + 1, [model], optimizer)
            for micro in range(micro_batches):
                with meter.goodput.measure("data_wait"):
                    batch = windows.batch(step * micro_batches + micro)
                losses = model(batch[:, :-1], positions, None, labels=batch[:, 1:])
                loss_sum = losses.float().sum()
                (loss_sum / losses.numel() / micro_batches).backward()
                meter.add_loss(loss_sum, losses.numel())
            meter.add_aux(moe_aux_losses(micro_batches, clear=True))
            if training.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad)
            optimizer.step()
            hooks.after_step(step + 1, [model], optimizer)
            for bucket, seconds in hooks.pop_timings().items():
                meter.goodput.add(bucket, seconds)
            meter.add_aux(hooks.metrics())
            receipt.add_events(hooks.events())
            meter.step_done(step + 1, lr)
    return receipt

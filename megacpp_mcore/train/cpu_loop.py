"""The CPU training path: the same model, data and receipts as the GPU launcher, with a plain
PyTorch optimizer, because Megatron's ``pretrain`` (its optimizers and DDP wrapper) requires
CUDA. The receipt says which path ran.

What is the same as on GPU: ``build_model`` (the recipe's layout and sizes, the backend
dispatcher's record), the data (the embedded corpus or an indexed dataset, byte tokens, fixed
windows), the loss (mean token cross-entropy over the global batch, MoE aux losses through
Megatron's autoscaler, scaled per micro-batch as Megatron's schedule does), the LR schedule
(Megatron's own ``OptimizerParamScheduler``, stepped as Megatron steps it), gradient clipping
and the receipt.
What differs: torch AdamW on fp32 parameters instead of Megatron's distributed optimizer, a
single process (data-parallel size 1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megacpp_mcore.backend import receipt_backends
from megacpp_mcore.errors import DataError, RecipeError
from megacpp_mcore.receipt import Receipt
from megacpp_mcore.settings.config import TrainingConfig
from megacpp_mcore.settings.recipe import Recipe
from megacpp_mcore.train.data import TokenWindows, prepare_embedded
from megacpp_mcore.train.flops import model_flops_per_token
from megacpp_mcore.train.hooks import HookContext, HookList
from megacpp_mcore.train.meter import IntervalMeter, moe_aux_losses

TRAINING_PATH = "cpu: torch AdamW over the Megatron model (Megatron's pretrain needs CUDA)"


def lr_scheduler(optimizer: torch.optim.Optimizer,
                 training: TrainingConfig) -> OptimizerParamScheduler:
    """Megatron's own ``OptimizerParamScheduler``, built as Megatron-LM's
    ``get_optimizer_param_scheduler`` builds it for iteration-based training: steps counted
    in samples (iterations x global batch), warm-up from ``--lr-warmup-init`` (0.0, its
    default), decay over ``train_iters``, constant weight decay. The loop steps it as
    Megatron's ``train_step`` does, by one global batch after each optimizer step, so with
    warm-up the first step trains at lr 0, exactly as on the Megatron path."""
    samples = training.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters * samples,
        lr_decay_steps=training.train_iters * samples,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters * samples,
        wd_incr_style="constant",
    )


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
    """AdamW with weight decay on matrices only (biases and norm weights excluded); each
    group's ``wd_mult`` is what Megatron's scheduler multiplies the weight decay by."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": training.weight_decay,
         "wd_mult": 1.0},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "wd_mult": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=training.lr,
                             betas=(training.adam_beta1, training.adam_beta2))


def train_on_cpu(
    recipe: Recipe,
    *,
    receipt_path: Path | None = None,
    receipt_dir: Path | None = None,
    train_iters: int | None = None,
    print_fn: Callable[[str], None] | None = print,
    hooks: HookList | None = None,
) -> Receipt:
    """Train ``recipe`` on the CPU; returns the (finished) receipt.

    The receipt goes to ``receipt_path``, else ``receipt_dir/<run-id>.json`` (default: the
    recipe's ``logging.receipt_dir``). ``hooks``: the run's training hooks
    (:mod:`megacpp_mcore.train.hooks`), built from the recipe by
    :func:`megacpp_mcore.features.build_training_hooks`; called at the same points of an
    iteration as on the Megatron path.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megacpp_mcore.distributed import init_process_groups
    from megacpp_mcore.model import build_model

    training = recipe.training
    steps = training.train_iters if train_iters is None else train_iters
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecipeError(f"train_iters must be a positive integer, got {steps!r}")
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
    scheduler = lr_scheduler(optimizer, training)
    hooks = hooks if hooks is not None else HookList()
    hooks.install([model], HookContext(num_microbatches=micro_batches, path="cpu",
                                       layout=layout))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / micro_batches))
    # start from an empty MoE loss tracker: it is Megatron's, process-wide, and an earlier
    # run or forward pass in this process leaves its values there (step 1 would count them)
    moe_aux_losses(micro_batches, clear=True)

    receipt = Receipt.create(
        receipt_path,
        receipt_dir=receipt_dir or recipe.logging.receipt_dir,
        recipe_name=recipe.name,
        recipe_hash=recipe.recipe_hash,
        layout=model.layer_plan,
        backends=receipt_backends(model.backend_record),
        parallel={"tensor": 1, "pipeline": 1, "expert": 1, "context": 1, "data": 1},
        model={"flops_per_token": model_flops_per_token(model.layer_plan, recipe.model),
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
            lr = optimizer.param_groups[0]["lr"]  # this step's, as the launcher records it
            optimizer.zero_grad(set_to_none=True)
            hooks.before_step(step + 1, [model], optimizer)
            for micro in range(micro_batches):
                with meter.goodput.measure("data_wait"):
                    batch = windows.batch(step * micro_batches + micro)
                hooks.before_micro_batch({"tokens": batch[:, :-1]})
                losses = model(batch[:, :-1], positions, None, labels=batch[:, 1:])
                loss_sum = losses.float().sum()
                (loss_sum / losses.numel() / micro_batches).backward()
                meter.add_loss(loss_sum, losses.numel())
            meter.add_aux(moe_aux_losses(micro_batches, clear=True))
            if training.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad)
            optimizer.step()
            scheduler.step(increment=training.global_batch_size)
            hooks.after_step(step + 1, [model], optimizer)
            for bucket, seconds in hooks.pop_timings().items():
                meter.goodput.add(bucket, seconds)
            meter.add_aux(hooks.metrics())
            receipt.add_events(hooks.events())
            meter.step_done(step + 1, lr)
    return receipt

"""The GPU training path: Megatron-LM's own ``pretrain`` with this plugin's model and receipts.

``scripts/pretrain_nam.py`` runs :func:`main` under torchrun with the flags of
``megacpp translate --target plugin``. The flow is Megatron's (the supported megatron-core):
``parse_and_validate_args`` with the plugin's ``extra_args_provider``,
``hybrid_config_from_args`` (whose ``--spec`` is the plugin's stack spec, so Megatron's own
HybridModel builder builds every layer through this project's specs), then
``pretrain_cfg_container_from_args`` and ``pretrain``. The wheel ships no dataset provider or
forward step; the ~60 lines below are those, for Megatron's GPT datasets (indexed or mock).

Training hooks (:mod:`megacpp_mcore.train.hooks`, built by
:func:`megacpp_mcore.features.build_training_hooks` from the plugin's flags) run at the same
points as on the CPU path, through seams Megatron already offers (nothing is patched):

* the optimizer is the object Megatron itself handed to the model config
  (``config.grad_scale_func`` is its bound ``scale_loss``); the model chunks are its
  ``model_chunks``;
* ``install`` and ``before_step(step)`` run from the plugin's forward step, at the first
  micro-batch of each training iteration: the previous step (including Megatron's copy of fp32
  main params into model params and the data-parallel param gather) is complete and no
  gradient of this iteration exists yet, the safe point to apply interventions;
* ``after_step(step)`` runs from a torch step post-hook on the LAST inner optimizer Megatron
  steps (per instance, not process-global): every inner step is done and the reduced main
  grads are still there (they are zeroed at the start of the next iteration);
* hook metrics go to the receipt meter and Megatron's TensorBoard writer, events to the
  receipt, hook time to the goodput bucket the hook names, hook state to a file per saved
  iteration and rank under ``--save`` (``megacpp_hooks/iter_NNNNNNN/rankNNNNN.pt``), read back
  on ``--load`` so a resumed run decides as an uninterrupted one.

Receipts: the same post-hook closes each iteration in the
:class:`~megacpp_mcore.train.meter.IntervalMeter`; the loss comes from the loss function below,
aux losses from Megatron's MoE and MTP trackers. Checkpoints are Megatron's (``--save``/``--load``);
a resumed run continues its receipt.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from megacpp_mcore.backend import dsa_rotation, receipt_backends
from megacpp_mcore.errors import MegacppError
from megacpp_mcore.features import build_training_hooks
from megacpp_mcore.megatron import compat
from megacpp_mcore.megatron.args import (
    add_megacpp_args,
    plasticity_config_from_args,
    section_from_args,
    stp_config_from_args,
)
from megacpp_mcore.megatron.builder import with_plugin_builder
from megacpp_mcore.receipt import Receipt, Terminated, load_receipt, sigterm_raises
from megacpp_mcore.train.hooks import HookContext, HookList
from megacpp_mcore.train.meter import IntervalMeter, moe_aux_losses, mtp_losses

#: folder under --save / --load with the training hooks' state, one file per iteration and rank.
HOOK_STATE_DIR = "megacpp_hooks"

#: the tracker of this process (set by main); the forward step and hooks report into it.
TRACKER: RunTracker | None = None


# --------------------------------------------------------------------------- data


def dataset_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron GPT datasets (indexed ``--data-path``, or mock data when there is none), built
    on every rank (``is_distributed``), so each tensor-parallel rank reads the same batch
    itself instead of receiving a broadcast."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.training import get_args, get_tokenizer

    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, lambda: True, config
    ).build()


dataset_provider.is_distributed = True


# --------------------------------------------------------------------------- step


def loss_func(loss_mask: torch.Tensor, training: bool, output_tensor: torch.Tensor):
    """Summed token loss, token count and Megatron's reporting pair (per-token averaging).
    Training micro-batches also go to the receipt (validation ones do not)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    if training and TRACKER is not None:
        TRACKER.meter.add_loss(loss_sum, num_tokens)
    report = torch.cat([loss_sum.detach().view(1), num_tokens.view(1).float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch: read it (timed as data wait), run the model, return the loss."""
    if TRACKER is not None:
        TRACKER.ensure_started()
        if model.training:
            TRACKER.account_gap()
            TRACKER.begin_iteration(model)
    started = time.perf_counter()
    batch = next(data_iterator)
    if TRACKER is not None and model.training:
        TRACKER.meter.goodput.add("data_wait", time.perf_counter() - started)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    if TRACKER is not None and model.training:
        TRACKER.hooks.before_micro_batch({"tokens": batch["tokens"]})
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"], model.training)


# --------------------------------------------------------------------------- receipts


class RunTracker:
    """Per-process training telemetry; rank 0 of the last pipeline stage writes the receipt."""

    def __init__(self, args, hooks: HookList | None = None, stack_spec=None) -> None:
        from megacpp_mcore.plan import parse_plan

        self.args = args
        #: the per-layer plan the flags carry (None: not the plugin's stack)
        self.layer_plan = parse_plan(args.megacpp_plan) if args.megacpp_plan else None
        self.layout = self.layer_plan.layout if self.layer_plan else None
        #: the stack spec the model is built from (None: Megatron's --spec object's)
        self.stack_spec = stack_spec
        self.meter: IntervalMeter | None = None
        self.writer = False
        self.hooks = hooks if hooks is not None else HookList()
        self.optimizer = None
        self.model_chunks: list = []
        self.context: HookContext | None = None
        self._step_handle = None
        self._begun_step: int | None = None
        self._saved_step: int | None = None
        self._last_step: tuple[int, float] | None = None

    def ensure_started(self) -> None:
        """At the first training micro-batch (Megatron's groups and the model exist by then),
        create the meter and (on the writing rank) create or continue the receipt."""
        if self.meter is not None:
            return
        from megatron.core import parallel_state

        from megacpp_mcore.megatron.spec_seam import megacpp_stack_spec
        from megacpp_mcore.train.flops import model_flops_per_token, peak_tflops

        args = self.args
        first_step = args.curr_iteration + 1
        self.writer = (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        self.num_microbatches = args.global_batch_size // (
            args.micro_batch_size * parallel_state.get_data_parallel_world_size())
        world = torch.distributed.get_world_size()
        model_config = None
        if self.layout is not None:
            from megacpp_mcore.megatron.args import model_config_from_args

            model_config = model_config_from_args(args)
        flops = model_flops_per_token(self.layer_plan, model_config) if model_config else 0.0
        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        spec = self.stack_spec or megacpp_stack_spec
        record = spec.params.get("backend_record", {}) if self.layout else {}
        if self.layer_plan is not None:  # the paths the backend chose, for the receipt
            self.layer_plan = self.layer_plan.with_paths(
                {letter: build["path"] for letter, build in record["families"].items()})
        receipt = None
        if self.writer:
            receipt = self._open_receipt(first_step, record, flops, peak, world)
        self.meter = IntervalMeter(
            receipt if receipt is not None else _NullReceipt(),
            tokens_per_step=args.global_batch_size * args.seq_length,
            flops_per_token=flops,
            num_gpus=world,
            peak_tflops=peak,
            log_interval=args.log_interval,
            print_fn=print if self.writer else None,
            reduce_loss=_sum_over_data_parallel,
        )

    def _open_receipt(self, first_step, record, flops, peak, world) -> Receipt:
        args = self.args
        target = Path(args.megacpp_receipt or "runs/")
        resume_step = first_step - 1
        if resume_step > 0:
            previous = _receipt_to_continue(target, args.megacpp_recipe_hash, resume_step)
            if previous is not None:
                previous.resume(resume_step)
                print(f"continuing receipt {previous.path} from step {resume_step}")
                return previous
        return Receipt.create(
            None if str(args.megacpp_receipt or "").endswith("/") or target.is_dir() else target,
            receipt_dir=target,
            recipe_name=Path(args.megacpp_recipe).stem if args.megacpp_recipe else None,
            recipe_hash=args.megacpp_recipe_hash,
            layout=self.layer_plan,
            backends=receipt_backends(record),
            parallel={"tensor": args.tensor_model_parallel_size,
                      "pipeline": args.pipeline_model_parallel_size,
                      "expert": args.expert_model_parallel_size,
                      "context": args.context_parallel_size,
                      "data": args.data_parallel_size, "world": world,
                      "sequence_parallel": args.sequence_parallel},
            model={"flops_per_token": flops, "peak_tflops": peak,
                   "training_path": "gpu: Megatron pretrain"},
            notes={"train_iters": args.train_iters, "save": args.save, "load": args.load,
                   "resumed_from_step": resume_step or None,
                   "training_hooks": [hook.name for hook in self.hooks]},
        )

    # ------------------------------------------------------------------ training hooks

    def _attach(self, model) -> None:
        """At the first training micro-batch: find the optimizer Megatron built (its bound
        ``scale_loss`` is the model config's ``grad_scale_func``), install the hooks on its
        model chunks, hook the last inner optimizer's step, restore hook state on resume."""
        from megatron.core.utils import get_model_config

        from megacpp_mcore.plasticity.adapter import inner_optimizers

        scale = getattr(get_model_config(model), "grad_scale_func", None)
        optimizer = getattr(scale, "__self__", None)
        if optimizer is None:
            raise MegacppError("Megatron gave the model config no optimizer (grad_scale_func "
                               "is unset); the plugin's training hooks need one")
        self.optimizer = optimizer
        self.model_chunks = list(getattr(optimizer, "model_chunks", None) or [model])
        inner = inner_optimizers(optimizer)
        if not inner:
            raise MegacppError("Megatron's optimizer has no inner optimizer on this rank")
        self._step_handle = inner[-1].register_step_post_hook(self._on_step_done)
        loaded = self.args.curr_iteration if self.args.load and self.args.curr_iteration > 0 \
            else None  # the iteration of the checkpoint this run resumed from
        self.context = HookContext(num_microbatches=self.num_microbatches,
                                   loss_scale=float(optimizer.get_loss_scale()),
                                   path="megatron", layout=self.layout,
                                   extra={"args": self.args, "eod_id": _eod_id(),
                                          "loaded_iteration": loaded,
                                          "seq_length": self.args.seq_length})
        self.hooks.install(self.model_chunks, self.context)
        if loaded is not None and self.hooks:
            self._load_hook_state(loaded)

    def begin_iteration(self, model) -> None:
        """Training micro-batch: at the first one of an iteration, ``before_step``."""
        if self.optimizer is None:
            self._attach(model)
        step = self.args.curr_iteration + 1
        if step == self._begun_step:
            return
        self._begun_step = step
        self.context.loss_scale = float(self.optimizer.get_loss_scale())
        self.hooks.before_step(step, self.model_chunks, self.optimizer)

    def _on_step_done(self, inner_optimizer, *_args, **_kwargs) -> None:
        """Post-hook of the last inner optimizer: the iteration's optimizer step is done."""
        step = self.args.curr_iteration + 1
        self.ensure_started()
        self.hooks.after_step(step, self.model_chunks, self.optimizer)
        for bucket, seconds in self.hooks.pop_timings().items():
            self.meter.goodput.add(bucket, seconds)
        metrics = self.hooks.metrics()
        events = self.hooks.events()
        self._to_tensorboard(step, metrics, events)
        self.meter.receipt.add_events(events)
        self.meter.add_aux(moe_aux_losses(self.num_microbatches, clear=False))
        self.meter.add_aux(mtp_losses(self.num_microbatches))
        self.meter.add_aux(metrics)
        self.meter.step_done(step, inner_optimizer.param_groups[0]["lr"])
        args = self.args
        if self.hooks and args.save and args.save_interval and step % args.save_interval == 0:
            self._save_hook_state(step)
        self._last_step = (step, time.perf_counter())

    def _to_tensorboard(self, step: int, metrics: dict, events: list) -> None:
        from megatron.training import get_tensorboard_writer

        writer = get_tensorboard_writer()
        if writer is None:
            return
        for name, value in metrics.items():
            writer.add_scalar(f"megacpp/{name}", value, step)
        for event in events:
            writer.add_scalar(f"plasticity/{event['kind']}_touched", event["touched"], step)
            writer.add_scalar(f"plasticity/{event['kind']}_seconds", event["seconds"], step)

    def _hook_state_path(self, root: str, step: int) -> Path:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return Path(root) / HOOK_STATE_DIR / f"iter_{step:07d}" / f"rank{rank:05d}.pt"

    def _save_hook_state(self, step: int) -> None:
        path = self._hook_state_path(self.args.save, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"step": step, "hooks": self.hooks.state_dict()}, tmp)
        tmp.replace(path)
        self._saved_step = step

    def _load_hook_state(self, step: int) -> None:
        path = self._hook_state_path(self.args.load, step)
        if not path.is_file():
            raise MegacppError(
                f"resuming at iteration {step} with training hooks "
                f"({', '.join(h.name for h in self.hooks)}) but their state {path} is missing: "
                "the checkpoint was saved without them, so the run cannot decide as an "
                "uninterrupted one; resume from a checkpoint saved with the same hooks")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.hooks.load_state_dict(state["hooks"])
        if self.writer:
            print(f"training hooks: state restored from {path.parent}")

    def account_gap(self) -> None:
        """At the first micro-batch after an optimizer step: Megatron spent the time since
        then on logging and, after a save step, on writing the checkpoint; the latter goes to
        the checkpoint bucket (the rest stays unclaimed, i.e. "other")."""
        if self._last_step is None:
            return
        step, ended = self._last_step
        self._last_step = None
        args = self.args
        if args.save and args.save_interval and step % args.save_interval == 0:
            self.meter.goodput.add("checkpoint", time.perf_counter() - ended)

    def finish(self, status: str) -> None:
        if self._step_handle is not None:
            self._step_handle.remove()
        last = self._last_step[0] if self._last_step else None
        if (self.hooks and self.args.save and last is not None and status == "completed"
                and self._saved_step != last):
            self._save_hook_state(last)  # Megatron saves at the end of training, too
        self.hooks.remove()
        if self.meter is not None and self.writer:
            self.meter.receipt.finish(status)
            print(f"receipt: {self.meter.receipt.path} ({status})")


def _sum_over_data_parallel(totals: torch.Tensor) -> torch.Tensor:
    """[loss_sum, tokens] summed over the data-parallel ranks (each saw other batches)."""
    from megatron.core import parallel_state

    device = "cuda" if torch.cuda.is_available() else "cpu"
    totals = totals.to(device)
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return totals


class _NullReceipt:
    """Stands in for the receipt on ranks that do not write one."""

    path = None

    def add_events(self, events, **_kwargs):
        pass

    def log_interval(self, step, **fields):
        return {"step": step, "aux_losses": {}, **fields}


def _receipt_to_continue(target: Path, recipe_hash: str | None, resume_step: int):
    """The receipt a resumed run continues: ``target`` itself if it is a file, else the
    newest receipt in the folder for the same recipe that got at least to ``resume_step``."""
    if target.is_file():
        return load_receipt(target)
    if not target.is_dir():
        return None
    candidates = []
    for path in target.glob("*.json"):
        try:
            receipt = load_receipt(path)
        except MegacppError:
            continue
        steps = [iv["step"] for iv in receipt.intervals]
        if receipt.data["recipe"].get("hash") == recipe_hash and steps and max(
                steps) >= resume_step:
            candidates.append((path.stat().st_mtime, receipt))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


# --------------------------------------------------------------------------- entry point


def dsa_rotation_for_this_machine(args) -> str | None:
    """Turn DSA's indexer rotation off where ``fast_hadamard_transform`` is missing.

    Megatron's DSA indexer cannot build without it. The plugin then trains DSA without the
    rotation (different indexer maths): ``args.megacpp_dsa_rotation_asked`` keeps what was
    asked, so the stack spec's backend record (and the receipt) carries the deviation.
    Returns the note, or None when nothing changed.
    """
    if (getattr(args, "experimental_attention_variant", None) != "dsa"
            or not getattr(args, "dsa_indexer_rotate_activation", False)):
        return None
    rotate, note = dsa_rotation(True)
    if rotate:
        return None
    args.dsa_indexer_rotate_activation = False
    args.megacpp_dsa_rotation_asked = True
    return note


def _eod_id() -> int | None:
    """The tokenizer's end-of-document id (STP never samples across it), or None."""
    from megatron.training import get_tokenizer

    try:
        return int(get_tokenizer().eod)
    except Exception:  # a tokenizer without an EOD token: documents are not split
        return None


def hooks_from_args(args) -> HookList:
    """The run's training hooks from the plugin's flags (the recipe's feature sections)."""
    recipe = SimpleNamespace(plasticity=plasticity_config_from_args(args),
                             stp=stp_config_from_args(args),
                             training=SimpleNamespace(seed=args.seed,
                                                      lr_warmup_iters=args.lr_warmup_iters),
                             data=SimpleNamespace(tokenizer=None))
    hooks = build_training_hooks(recipe)
    if hooks and getattr(args, "overlap_param_gather", False):
        raise MegacppError(
            "training hooks (" + ", ".join(h.name for h in hooks) + ") with "
            "--overlap-param-gather: the data-parallel param gather would land after the "
            "safe point and overwrite an intervention; drop --overlap-param-gather")
    return hooks


def main() -> int:
    """Parse Megatron's args (plugin flags included) and run Megatron's pretrain."""
    global TRACKER
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        hybrid_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from megacpp_mcore.megatron.spec_seam import megacpp_stack_spec, stack_spec_from_args
    from megacpp_mcore.train.data import prepare_embedded

    compat.use_shipped_dataset_helpers()
    args = parse_and_validate_args(extra_args_provider=add_megacpp_args)
    if args.megacpp_data == "embedded" and not args.data_path:
        args.data_path = [str(prepare_embedded())]
    if args.context_parallel_size != 1:
        raise MegacppError("the plugin launcher does not split batches for context "
                           "parallelism yet (context parallel size must be 1)")
    deviation = dsa_rotation_for_this_machine(args)
    if deviation:
        print(f"megacpp: {deviation}", file=sys.stderr, flush=True)
    model_config = with_plugin_builder(hybrid_config_from_args(args),
                                       section_from_args("model.ngram_hash", args), args)
    if model_config.hybrid_stack_spec is megacpp_stack_spec:
        # the seam, called explicitly with the args parsed here (Megatron's --spec object
        # would call the same function on Megatron's global args)
        model_config.hybrid_stack_spec = stack_spec_from_args(args)
    config = pretrain_cfg_container_from_args(args, model_config)

    TRACKER = RunTracker(args, hooks_from_args(args), model_config.hybrid_stack_spec)
    status = "completed"
    try:
        with sigterm_raises():  # torchrun passes SIGTERM on to every rank
            pretrain(config, dataset_provider, ModelType.encoder_or_decoder, forward_step)
    except Terminated:
        status = "terminated"
        raise
    except SystemExit as err:  # Megatron exits normally at --exit-interval / --exit-duration
        status = "completed" if err.code in (None, 0) else f"failed: exit code {err.code}"
        raise
    except BaseException as err:
        status = ("interrupted" if isinstance(err, KeyboardInterrupt)
                  else f"failed: {type(err).__name__}: {err}"[:500])
        raise
    finally:
        TRACKER.finish(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())

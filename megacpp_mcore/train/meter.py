"""Turning training steps into receipt intervals, the same way on every training path.

The CPU loop and the Megatron launcher both call :meth:`IntervalMeter.step_done` once per
optimizer step with the step's summed token loss; every ``log_interval`` steps the meter
synchronises the device once, computes loss, tokens/s, model TFLOP/s per GPU (``flops``),
MFU, peak memory and goodput, appends the interval to the receipt (written atomically) and
prints one progress line. Aux losses are read from Megatron's MoE metrics tracker, where the
routers record them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from megacpp_mcore.receipt import Goodput, Receipt


def moe_aux_losses(num_microbatches: int, clear: bool) -> dict[str, float]:
    """Megatron's tracked MoE losses for the last step: per name, the mean over the MoE
    layers that recorded one and over micro-batches, reduced across ranks the way Megatron's
    own log reduces them (pipeline stages summed, the entry's reduce group summed, its
    average group and data parallel averaged), on a copy so Megatron's log is unchanged.
    Every rank must call it at the same step (it runs collectives)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    losses = {}
    for name, entry in sorted(tracker.metrics.items()):
        values = entry.values.detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
            if entry.reduce_group is not None:
                dist.all_reduce(values, group=entry.reduce_group)
            if entry.avg_group is not None:
                dist.all_reduce(values, group=entry.avg_group, op=dist.ReduceOp.AVG)
            if entry.needs_dp_avg:
                dist.all_reduce(values, op=dist.ReduceOp.AVG,
                                group=parallel_state.get_data_parallel_group())
        layers = int((values != 0).sum().item())
        if layers:
            losses[name] = values.sum().item() / layers / max(1, num_microbatches)
    if clear:
        tracker.clear()
    return losses


def mtp_losses(num_microbatches: int) -> dict[str, float]:
    """Megatron's multi-token-prediction losses for the last step (``mtp_1_loss``, ...):
    per MTP depth, summed over the tracker's reduce group, averaged over its average group,
    divided by the micro-batches, as Megatron's own log does, on a copy (Megatron logs and
    clears its tracker later). Every rank must call it at the same step."""
    import torch.distributed as dist
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" not in tracker:
        return {}
    values = tracker["loss_values"].detach().float().clone()
    if dist.is_initialized():
        if tracker.get("reduce_group") is not None:
            dist.all_reduce(values, group=tracker["reduce_group"])
        if tracker.get("avg_group") is not None:
            dist.all_reduce(values, group=tracker["avg_group"], op=dist.ReduceOp.AVG)
    values /= max(1, num_microbatches)
    return {f"mtp_{depth}_loss": value for depth, value in enumerate(values.tolist(), 1)}


class IntervalMeter:
    """Accumulates steps and writes one receipt interval every ``log_interval`` steps."""

    def __init__(
        self,
        receipt: Receipt,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        num_gpus: int,
        peak_tflops: float | None,
        log_interval: int,
        goodput: Goodput | None = None,
        print_fn: Callable[[str], None] | None = print,
        reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.receipt = receipt
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.num_gpus = num_gpus
        self.peak_tflops = peak_tflops
        self.log_interval = log_interval
        self.goodput = goodput or Goodput()
        self.print_fn = print_fn
        # sums [loss_sum, tokens] over the ranks that saw other data (data parallel), if any
        self.reduce_loss = reduce_loss
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_tokens: torch.Tensor | float = 0.0
        self._aux: dict[str, float] = {}
        self._steps = 0
        self._interval_start = time.perf_counter()
        self._compute_at_start = 0.0
        self.last_record: dict | None = None
        self._first_interval = True

    def add_loss(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> None:
        """Add a micro-batch's summed token loss (kept on the device until logging)."""
        self._loss_sum = self._loss_sum + loss_sum.detach().float()
        self._loss_tokens = self._loss_tokens + num_tokens

    def add_aux(self, aux: dict[str, float]) -> None:
        for name, value in aux.items():
            self._aux[name] = self._aux.get(name, 0.0) + value

    def step_done(self, step: int, lr: float | None) -> dict | None:
        """Record that optimizer step ``step`` finished; log if it ends an interval."""
        self._steps += 1
        if step % self.log_interval:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = now - self._interval_start
        # Everything in the interval that no other bucket claimed was training compute;
        # in the first interval this process logs, it was warm-up (kernel compilation,
        # autotuning, allocator growth), so it goes there and the interval is flagged.
        warmup = self._first_interval
        claimed = sum(self.goodput.buckets.values()) - self._compute_at_start
        self.goodput.add("warmup_compile" if warmup else "compute", max(0.0, elapsed - claimed))
        tokens_per_s = self._steps * self.tokens_per_step / elapsed if elapsed > 0 else None
        tflops = None
        if tokens_per_s is not None:
            tflops = self.flops_per_token * tokens_per_s / self.num_gpus / 1e12
        totals = torch.stack([torch.as_tensor(self._loss_sum, dtype=torch.float32),
                              torch.as_tensor(self._loss_tokens, dtype=torch.float32)])
        if self.reduce_loss is not None:
            totals = self.reduce_loss(totals)
        loss_sum, loss_tokens = totals.tolist()
        loss = loss_sum / loss_tokens if loss_tokens > 0 else None
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        record = self.receipt.log_interval(
            step,
            loss=loss,
            aux_losses={name: value / self._steps for name, value in self._aux.items()},
            lr=lr,
            tokens_per_s=tokens_per_s,
            tflops_per_gpu=tflops,
            mfu=(tflops / self.peak_tflops) if (tflops and self.peak_tflops) else None,
            peak_memory_bytes=peak,
            goodput=self.goodput,
            warmup=warmup,
        )
        if self.print_fn is not None:
            self.print_fn(progress_line(record))
        self.last_record = record
        self._loss_sum, self._loss_tokens, self._aux, self._steps = 0.0, 0.0, {}, 0
        self._interval_start = time.perf_counter()
        self._compute_at_start = sum(self.goodput.buckets.values())
        self._first_interval = False
        return record


def progress_line(record: dict) -> str:
    """One human line per interval: step, loss, aux losses, lr, throughput."""

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    aux = "".join(f"  {k} {v:.4f}" for k, v in record["aux_losses"].items())
    return (f"step {record['step']:>6}  loss {fmt(record['loss'], '.4f')}{aux}  "
            f"lr {fmt(record['lr'], '.2e')}  {fmt(record['tokens_per_s'], ',.0f')} tok/s  "
            f"{fmt(record['tflops_per_gpu'], '.3f')} TFLOP/s/GPU")

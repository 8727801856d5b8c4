"""STP's hook against the explicit loss, shared by the CPU and GPU tests.

The same micro-batches run twice: once with :class:`StpHook` injecting its gradient, once with
``(lm + weight * stp) / micro`` written out from forward-hook captures of the chosen layers'
outputs; a third pass without STP shows the term really changes the gradients.
"""

from __future__ import annotations

import torch

from megacpp_mcore.settings.config import StpConfig
from megacpp_mcore.stp import StpHook, sample_seed, stp_loss
from megacpp_mcore.train.hooks import HookContext, HookList


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _passes(model, data, positions, extra_loss=None):
    """Forward and backward every micro-batch; ``extra_loss(m, tokens)`` adds to its loss."""
    micro = data.shape[0]
    for m in range(micro):
        tokens = data[m, :, :-1]
        losses = model(tokens, positions, None, labels=data[m, :, 1:])
        extra = extra_loss(m, tokens) if extra_loss is not None else 0.0
        ((losses.float().mean() + extra) / micro).backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out


def hook_vs_explicit(model, layout, layers, data, *, step, weight, seed, eod_id, triples,
                     path="cpu", gather=None):
    """``(via_hook, explicit, plain, logged, values)``: parameter gradients through the hook,
    through the explicit loss and without STP; the hook's logged metrics; the explicit STP
    value per micro-batch. ``data``: ``[micro, batch, seq + 1]`` tokens on the model's
    device; ``gather``: makes a sequence-parallel layer output whole (None: it is whole)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    micro, batch, seq = data.shape[0], data.shape[1], data.shape[2] - 1
    device = data.device
    positions = torch.arange(seq, device=device).expand(batch, seq)
    config = StpConfig(enabled=True, weight=weight, start_step=1, triples=triples, min_gap=2,
                       layers=layers)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / micro, device=device))

    hooks = HookList([StpHook(config, seed=seed, eod_id=eod_id)])
    hooks.install([model], HookContext(num_microbatches=micro, layout=layout, path=path))
    hooks.before_step(step, [model], None)
    for m in range(micro):
        hooks.before_micro_batch({"tokens": data[m, :, :-1]})
        model(data[m, :, :-1], positions, None, labels=data[m, :, 1:]).float().mean().div(
            micro).backward()
    via_hook = grads(model)
    logged = hooks.metrics()
    hooks.remove()
    model.zero_grad(set_to_none=True)

    chosen = list(layers) or [layout.depth]
    captured, values = [], []
    handles = [layer.register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.decoder.layers if layer.layer_number in chosen]

    def explicit_stp(m, tokens):
        stp = 0.0
        for hidden in captured:
            full = gather(hidden) if gather is not None else hidden
            gen = torch.Generator(device=device).manual_seed(sample_seed(seed, step, m, 0))
            stp = stp + stp_loss(full.transpose(0, 1), samples=triples, min_gap=2,
                                 eod_mask=tokens == eod_id, generator=gen)
        stp = stp / len(captured)
        captured.clear()
        values.append(stp.item())
        return weight * stp

    explicit = _passes(model, data, positions, explicit_stp)
    for handle in handles:
        handle.remove()
    plain = _passes(model, data, positions)
    return via_hook, explicit, plain, logged, values

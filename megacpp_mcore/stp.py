"""STP: the trajectory-straightness auxiliary loss (Huang, LeCun, Balestriero, arXiv 2602.22617).

Hidden states along a sequence should move in locally straight lines. Every sample is four
positions ``p0 <= p1 < p2 <= p3`` of one document, and the loss is ``1 - cos(u, v)`` with
``u = (h[p1] - h[p0]) + (h[p3] - h[p2])`` and ``v = h[p2] - h[p1]``, averaged over samples:

* ``triple`` (the paper's form): ``(s, r, t, t)``, i.e. ``1 - cos(h[t] - h[r], h[r] - h[s])``;
* ``span`` (the released code's ``random_span``): a random span ``[a, b]`` of a document
  ``[lo, hi]``, ``(lo, a, b, hi)``: the span's displacement against the rest of the trajectory.

A straight (monotone) trajectory gives 0 in both forms. Samples never cross an end-of-document
token (it closes its document) or padding, and consecutive points are ``min_gap`` apart.

In training, :class:`StpHook` (a :class:`~megacpp_mcore.train.hooks.TrainingHook`) puts forward
hooks on the chosen decoder layers and lets the loss enter backward through :class:`StpGrad`,
an identity autograd function with its own scale (as Megatron's ``MoEAuxLossAutoScaler`` does
for MoE losses; Megatron sets that one's scale only for models with experts). There is no second
forward pass and Megatron's loss function is unchanged.

Distributed: samples are drawn over the WHOLE sequence from a generator seeded by
``(seed, step, micro-batch, data-parallel rank)``, so every rank that holds a piece of the same
sequence (tensor-parallel ranks, sequence-parallel and context-parallel slices) draws the same
samples. Under sequence/context parallelism each rank contributes only the sampled rows it
holds and a sum over the split group (identity in backward) completes them: only
``batch x samples x 4`` rows move, never the hidden states.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megacpp_mcore.errors import SpecError
from megacpp_mcore.settings.config import StpConfig
from megacpp_mcore.settings.rules import BYTE_VOCAB_SIZE
from megacpp_mcore.train.hooks import HookContext, TrainingHook

FORMS = ("triple", "span")


# --------------------------------------------------------------------------- sampling


def sample_seed(seed: int, step: int, micro_batch: int, dp_rank: int) -> int:
    """A 63-bit seed from (seed, step, micro-batch, data-parallel rank): the sampling RNG."""
    text = f"stp:{seed}:{step}:{micro_batch}:{dp_rank}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _segments(eod_mask: torch.Tensor, valid_mask: torch.Tensor):
    """First and last position of the segment holding each position ([B, S] each).

    A segment ends at an end-of-document token (inclusive) and at every switch between
    valid and padding positions."""
    batch, seq = valid_mask.shape
    pos = torch.arange(seq, device=valid_mask.device).expand(batch, seq)
    start = torch.zeros_like(valid_mask)
    start[:, 0] = True
    start[:, 1:] = eod_mask[:, :-1] | (valid_mask[:, 1:] != valid_mask[:, :-1])
    end = torch.zeros_like(valid_mask)
    end[:, -1] = True
    end[:, :-1] = start[:, 1:]
    lo = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    hi_marks = torch.where(end, pos, torch.full_like(pos, seq))
    hi = hi_marks.flip(1).cummin(dim=1).values.flip(1)
    return lo, hi


def sample_points(
    batch: int,
    seq: int,
    *,
    samples: int,
    min_gap: int = 1,
    form: str = "triple",
    eod_mask: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` index quadruples per sequence: ``(points [B, K, 4], weights [B, K])``.

    Positions are global (over the whole sequence). A sequence with no document long enough
    (``2 * min_gap + 1`` positions) gets weight 0 for all its samples. Runs on ``device``
    without host synchronisation.
    """
    if form not in FORMS:
        raise SpecError(f"stp form {form!r} is not known; accepted: {', '.join(FORMS)}")
    if samples < 1 or min_gap < 1:
        raise SpecError(f"stp needs samples >= 1 and min_gap >= 1, got {samples}, {min_gap}")
    device = torch.device(device) if device is not None else (
        eod_mask.device if eod_mask is not None else torch.device("cpu"))
    if valid_mask is None:
        valid_mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    if eod_mask is None:
        eod_mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    valid_mask, eod_mask = valid_mask.to(device, torch.bool), eod_mask.to(device, torch.bool)
    if valid_mask.shape != (batch, seq) or eod_mask.shape != (batch, seq):
        raise SpecError(f"stp masks must be [batch, seq] = [{batch}, {seq}], got "
                        f"{list(valid_mask.shape)} and {list(eod_mask.shape)}")
    lo, hi = _segments(eod_mask, valid_mask)
    length = hi - lo + 1
    eligible = valid_mask & (length >= 2 * min_gap + 1)
    row_ok = eligible.any(dim=1)
    weights = torch.where(row_ok[:, None], eligible.float(), torch.ones_like(eligible.float()))
    anchor = torch.multinomial(weights, samples, replacement=True, generator=generator)
    lo, length = lo.gather(1, anchor), length.gather(1, anchor)
    uniform = torch.rand(batch, samples, 3, device=device, generator=generator)
    if form == "triple":
        room = (length - 2 * min_gap).clamp(min=1)
        x = (uniform * room[..., None]).long().minimum(room[..., None] - 1).sort(-1).values
        s, r, t = lo + x[..., 0], lo + x[..., 1] + min_gap, lo + x[..., 2] + 2 * min_gap
        points = torch.stack([s, r, t, t], dim=-1)
    else:
        hi = lo + length - 1
        # span length m in [min_gap, L - 1 - min_gap], start a in [lo, hi - m]
        m_room = (length - 2 * min_gap).clamp(min=1)
        m = min_gap + (uniform[..., 0] * m_room).long().minimum(m_room - 1)
        a_room = (length - m).clamp(min=1)
        a = lo + (uniform[..., 1] * a_room).long().minimum(a_room - 1)
        points = torch.stack([lo, a, a + m, hi], dim=-1)
    points = points.clamp(0, seq - 1)
    return points, row_ok[:, None].float().expand(batch, samples).contiguous()


# --------------------------------------------------------------------------- sequence split


@dataclass
class SequenceSplit:
    """Which global positions this rank holds, and the groups that hold the others.

    ``positions``: global position of each local row (``[s_local]``); ``seq_length``: the
    whole sequence; ``groups``: process groups whose ranks hold the other slices (summed over
    in order: e.g. the tensor-parallel group under sequence parallelism, then the
    context-parallel group).
    """

    positions: torch.Tensor
    seq_length: int
    groups: list[Any] = field(default_factory=list)

    def local_index(self) -> torch.Tensor:
        """[seq_length]: the local row of each global position, -1 where another rank has it."""
        index = torch.full((self.seq_length,), -1, dtype=torch.long,
                           device=self.positions.device)
        index[self.positions] = torch.arange(len(self.positions), device=self.positions.device)
        return index


def split_positions(local_len: int, *, tp_rank: int = 0, tp_size: int = 1, cp_rank: int = 0,
                    cp_size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of the ``local_len`` rows a rank holds.

    Context parallelism (Megatron's load-balanced split): the sequence is cut into
    ``2 * cp_size`` chunks and CP rank ``i`` holds chunks ``i`` and ``2 * cp_size - 1 - i``,
    in that order. Sequence parallelism then cuts that CP-local sequence into ``tp_size``
    contiguous pieces, one per tensor-parallel rank (pass ``tp_size`` 1 without SP).
    """
    cp_len = local_len * tp_size
    local = torch.arange(local_len, device=device) + tp_rank * local_len
    if cp_size == 1:
        return local
    if cp_len % 2:
        raise SpecError(f"context parallelism needs an even local sequence, got {cp_len}")
    chunk = cp_len // 2
    first = cp_rank * chunk + local
    second = (2 * cp_size - 1 - cp_rank) * chunk + (local - chunk)
    return torch.where(local < chunk, first, second)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every rank computes the same loss from the
    completed rows, and each rank's share of the gradient flows into the rows it holds."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def gather_points(hidden: torch.Tensor, points: torch.Tensor,
                  split: SequenceSplit | None = None) -> torch.Tensor:
    """Rows ``hidden[b, points[b, k, j]]`` as ``[B, K, 4, H]`` (``hidden`` is ``[B, S, H]``;
    under a split, ``[B, S_local, H]`` and the rows come from every rank of the split)."""
    batch = torch.arange(points.shape[0], device=points.device)[:, None, None]
    if split is None:
        return hidden[batch, points]
    local = split.local_index().to(points.device)[points]
    held = (local >= 0)[..., None]
    rows = hidden[batch, local.clamp(min=0)] * held.to(hidden.dtype)
    for group in split.groups:
        rows = _SumOverGroup.apply(rows, group)
    return rows


def straightness(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``1 - cos(u, v)`` over samples (fp32) from rows ``[B, K, 4, H]``."""
    rows = rows.float()
    u = (rows[..., 1, :] - rows[..., 0, :]) + (rows[..., 3, :] - rows[..., 2, :])
    v = rows[..., 2, :] - rows[..., 1, :]
    cos = F.cosine_similarity(u, v, dim=-1, eps=1e-8)
    weights = weights.to(cos.device, cos.dtype)
    return ((1.0 - cos) * weights).sum() / weights.sum().clamp(min=1.0)


def stp_loss(
    hidden: torch.Tensor,
    *,
    samples: int = 64,
    min_gap: int = 1,
    form: str = "triple",
    eod_mask: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    split: SequenceSplit | None = None,
) -> torch.Tensor:
    """The STP loss of ``hidden`` ``[batch, seq, hidden]`` (a scalar, fp32).

    ``samples`` triples (or spans) per sequence, ``min_gap`` positions apart, never across an
    ``eod_mask`` position (``[B, S]``, True at end-of-document tokens) or padding
    (``valid_mask`` False). Under a :class:`SequenceSplit`, ``hidden`` is this rank's slice
    and the masks cover the whole sequence.
    """
    batch = hidden.shape[0]
    seq = split.seq_length if split is not None else hidden.shape[1]
    points, weights = sample_points(batch, seq, samples=samples, min_gap=min_gap, form=form,
                                    eod_mask=eod_mask, valid_mask=valid_mask,
                                    generator=generator, device=hidden.device)
    return straightness(gather_points(hidden, points, split), weights)


# --------------------------------------------------------------------------- backward injection


class StpGrad(torch.autograd.Function):
    """Identity on ``hidden``; in backward, the loss receives gradient ``scale``.

    ``scale`` folds in the STP weight, 1/micro-batches, the mixed-precision loss scale and the
    context-parallel size (the plugin's own scale: Megatron sets ``MoEAuxLossAutoScaler``'s
    only for models with experts)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss, scale)
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        loss, scale = ctx.saved_tensors
        return grad, torch.ones_like(loss) * scale.to(loss.dtype), None


def stp_weight(config: StpConfig, step: int) -> float:
    """The STP weight at iteration ``step`` (1-based): 0 before ``start_step``, then a linear
    ramp over ``ramp_steps`` iterations (none when 0) up to ``weight``."""
    if not config.enabled or step < config.start_step:
        return 0.0
    if config.ramp_steps:
        return config.weight * min(1.0, (step - config.start_step + 1) / config.ramp_steps)
    return config.weight


# --------------------------------------------------------------------------- the training hook


def _decoder(chunk: torch.nn.Module) -> torch.nn.Module | None:
    """The HybridStack of a (possibly wrapped: DDP, Float16Module) model chunk."""
    module = chunk
    for _ in range(8):
        if hasattr(module, "decoder") and hasattr(module.decoder, "layers"):
            return module.decoder
        if not hasattr(module, "module"):
            return None
        module = module.module
    return None


class StpHook(TrainingHook):
    """The STP loss on forward hooks of the chosen decoder layers.

    ``install`` finds the layers (global 1-based layer numbers, default the last decoder layer;
    MTP layers are never chosen: they live outside the decoder and have their own loss), and
    reads the parallel split from Megatron's ``parallel_state``. What a loop passes:

    * ``HookContext.num_microbatches`` and ``loss_scale`` (or ``extra["loss_scale_fn"]``, a
      callable returning the current scale; else the model config's ``grad_scale_func``);
    * ``before_micro_batch(batch)`` before each micro-batch's forward with ``batch["tokens"]``
      ``[B, S]`` of the WHOLE sequence (before any context-parallel slicing) and, optionally,
      ``batch["padding_mask"]`` (True at padding); ``extra["eod_id"]`` names the
      end-of-document id (default: the constructor's);
    * ``metrics()`` on every rank once per step: under ``torch.distributed`` it sums over the
      pipeline and data-parallel groups (so the stage holding the layers reports it and data
      -parallel ranks are averaged; tensor/context-parallel ranks compute the same value and
      are not summed).
    """

    name = "stp"

    def __init__(self, config: StpConfig, *, seed: int = 1234, eod_id: int | None = None) -> None:
        if config.form not in FORMS:
            raise SpecError(f"stp.form {config.form!r}; accepted: {', '.join(FORMS)}")
        self.config = config
        self.seed = seed
        self.eod_id = eod_id
        self.step = 0
        self.weight = 0.0
        self._handles: list[Any] = []
        self._micro: dict[int, int] = {}
        self._points: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._batch: dict[str, torch.Tensor] | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.layers: list[int] = []

    @classmethod
    def from_recipe(cls, recipe: Any) -> StpHook:
        """The hook of ``recipe.stp``, seeded by the training seed; the byte tokenizer's
        end-of-document id marks document boundaries (a launcher may pass another)."""
        eod = BYTE_VOCAB_SIZE - 1 if recipe.data.tokenizer == "byte" else None
        return cls(recipe.stp, seed=recipe.training.seed, eod_id=eod)

    # ---- install
    def install(self, model_chunks: Sequence[torch.nn.Module], context: HookContext) -> None:

        self.context = context
        self.eod_id = context.extra.get("eod_id", self.eod_id)
        decoders = [d for d in (_decoder(c) for c in model_chunks) if d is not None]
        if not decoders:
            raise SpecError("stp: no Megatron decoder (HybridStack with .layers) in the model "
                            "chunks; STP hooks onto decoder layers")
        config = decoders[0].config
        depth = context.layout.depth if context.layout is not None else config.num_layers
        wanted = list(self.config.layers) or [depth]
        bad = [n for n in wanted if not 1 <= n <= depth]
        if bad:
            raise SpecError(f"stp.layers {bad}: decoder layers are numbered 1..{depth} "
                            "(MTP layers cannot be chosen)")
        if getattr(config, "recompute_granularity", None) == "full":
            raise SpecError("stp with full activation recomputation (--recompute-granularity "
                            "full) is not supported: the hooked layers would run twice; use "
                            "selective recomputation or none")
        if getattr(config, "calculate_per_token_loss", False):
            raise SpecError("stp with --calculate-per-token-loss is not supported: Megatron "
                            "then divides gradients by the token count, which the STP scale "
                            "does not undo")
        self.layers = wanted
        self._config = config  # Megatron sets config.grad_scale_func when training starts
        self._setup_split(config)
        found = []
        for decoder in decoders:
            self._handles.append(decoder.register_forward_pre_hook(self._on_decoder))
            for layer in decoder.layers:
                if layer.layer_number in wanted:
                    found.append(layer.layer_number)
                    self._handles.append(layer.register_forward_hook(
                        self._make_layer_hook(id(decoder))))
        self.local_layers = found  # empty on pipeline stages without a chosen layer

    def _setup_split(self, config) -> None:
        from megatron.core import parallel_state as ps

        self.dp_rank = 0
        self.tp = (0, 1, None)
        self.cp = (0, 1, None)
        if not ps.model_parallel_is_initialized():
            return
        self.dp_rank = ps.get_data_parallel_rank()
        if getattr(config, "sequence_parallel", False) and ps.get_tensor_model_parallel_world_size(
        ) > 1:
            self.tp = (ps.get_tensor_model_parallel_rank(),
                       ps.get_tensor_model_parallel_world_size(),
                       ps.get_tensor_model_parallel_group())
        if ps.get_context_parallel_world_size() > 1:
            self.cp = (ps.get_context_parallel_rank(), ps.get_context_parallel_world_size(),
                       ps.get_context_parallel_group())

    # ---- per step / micro-batch
    def before_step(self, step: int, model_chunks, optimizer) -> None:
        self.step = step
        self.weight = stp_weight(self.config, step)
        self._micro = {}

    def before_micro_batch(self, batch: dict[str, Any]) -> None:
        self._batch = batch

    def _on_decoder(self, module, args) -> None:
        if module.training:
            key = id(module)
            self._micro[key] = self._micro.get(key, -1) + 1
            self._points.pop(key, None)

    def _masks(self, batch: int, seq: int, device):
        tokens = (self._batch or {}).get("tokens")
        eod = valid = None
        if tokens is not None:
            if tuple(tokens.shape) != (batch, seq):
                raise SpecError(f"stp: the micro-batch tokens are {list(tokens.shape)}, the "
                                f"hidden states cover [{batch}, {seq}]; pass the whole "
                                "sequence's tokens (before context-parallel slicing)")
            if self.eod_id is not None:
                eod = tokens.to(device) == self.eod_id
        padding = (self._batch or {}).get("padding_mask")
        if padding is not None:
            valid = ~padding.to(device, torch.bool)
        return eod, valid

    def _split(self, local_len: int, device) -> SequenceSplit | None:
        (tp_rank, tp_size, tp_group), (cp_rank, cp_size, cp_group) = self.tp, self.cp
        if tp_size == 1 and cp_size == 1:
            return None
        positions = split_positions(local_len, tp_rank=tp_rank, tp_size=tp_size,
                                    cp_rank=cp_rank, cp_size=cp_size, device=device)
        groups = [g for g, size in ((tp_group, tp_size), (cp_group, cp_size)) if size > 1]
        return SequenceSplit(positions, local_len * tp_size * cp_size, groups)

    def _scale(self, device) -> torch.Tensor:
        """weight x loss scale x CP size / (micro-batches x chosen layers), on ``device``."""
        factor = self.weight * self.cp[1] / (self.context.num_microbatches * len(self.layers))
        scale_fn = self.context.extra.get("loss_scale_fn") or getattr(
            self._config, "grad_scale_func", None)
        if scale_fn is None:
            return torch.full((), float(self.context.loss_scale) * factor, device=device)
        loss_scale = torch.as_tensor(scale_fn(torch.ones(1, device=device)), device=device)
        return loss_scale.reshape(()).float() * factor

    def _make_layer_hook(self, decoder_key: int) -> Callable:
        def hook(module, args, output):
            if not module.training:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            seq_local, batch = hidden.shape[0], hidden.shape[1]
            split = self._split(seq_local, hidden.device)
            seq = split.seq_length if split is not None else seq_local
            points = self._points.get(decoder_key)
            if points is None:
                micro = self._micro.get(decoder_key, 0)
                generator = torch.Generator(device=hidden.device)
                generator.manual_seed(sample_seed(self.seed, self.step, micro, self.dp_rank))
                eod, valid = self._masks(batch, seq, hidden.device)
                points = sample_points(batch, seq, samples=self.config.triples,
                                       min_gap=self.config.min_gap, form=self.config.form,
                                       eod_mask=eod, valid_mask=valid, generator=generator,
                                       device=hidden.device)
                self._points[decoder_key] = points
            bsh = hidden.transpose(0, 1)  # Megatron's [s, b, h] -> [b, s, h], a view
            train = self.weight > 0 and torch.is_grad_enabled() and hidden.requires_grad
            with torch.set_grad_enabled(train):
                loss = straightness(gather_points(bsh, points[0], split), points[1])
            self._record(loss.detach())
            if not train:
                return None
            hidden = StpGrad.apply(hidden, loss, self._scale(hidden.device))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _record(self, loss: torch.Tensor) -> None:
        self._sum = loss.float() if self._sum is None else self._sum + loss.float()
        self._count += 1

    # ---- reporting
    def metrics(self) -> dict[str, float]:
        import torch.distributed as dist

        device = self._sum.device if self._sum is not None else "cpu"
        totals = torch.stack([
            self._sum if self._sum is not None else torch.zeros((), device=device),
            torch.tensor(float(self._count), device=device)])
        self._sum, self._count = None, 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                for group in (ps.get_pipeline_model_parallel_group(),
                              ps.get_data_parallel_group()):
                    if dist.get_world_size(group) > 1:
                        dist.all_reduce(totals, group=group)
        total, count = totals.tolist()
        if count == 0:
            return {}
        return {"stp_loss": total / count, "stp_weight": self.weight}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = [
    "FORMS",
    "SequenceSplit",
    "StpGrad",
    "StpHook",
    "gather_points",
    "sample_points",
    "sample_seed",
    "split_positions",
    "stp_loss",
    "stp_weight",
    "straightness",
]

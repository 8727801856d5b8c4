"""ReDo: find dormant hidden units of MLPs and recycle them.

Sokar et al., ICML 2023 (arXiv 2302.12902). A unit's score is its activity (an EMA of its mean
``|h|`` over the tokens of each step) divided by the mean activity of its layer; it is
tau-dormant if ``score <= tau``. Recycling re-initialises the unit's incoming rows (fc1; gate
and up rows for a gated MLP) from Megatron's initialisation distribution (normal, std
``init_method_std``), zeroes its outgoing column (fc2), and zeroes the optimizer moments of
exactly those entries (Adam's step count is kept).

Monitored: the hidden units of every F (dense MLP) layer and of every expert of every E layer
(routed experts one by one, the shared expert too), i.e. the input of each ``linear_fc2``.
Not monitored: attention heads and mixer channels (their "units" are not independent: a head
or SSM channel is shared by a gate, a state and a norm, and zeroing one column does not
remove it cleanly), and the router.

What "dormant" means depends on the activation. With squared-ReLU ``h = relu(x)^2`` is
exactly zero for every token with a negative pre-activation, and such a unit also gets no
gradient: a low score means a dead unit, which is what the paper recycles. With SwiGLU
``h = silu(gate) * up`` is almost never exactly zero and gradients keep flowing through
both branches: a low score means a unit that contributes little, not one that cannot learn,
so a smaller tau (e.g. 0.025 rather than 0.1) is the safer choice there.

Distributed: the hidden units of a layer are split over its tensor-parallel group, and each
data-parallel rank sees other tokens. At a check the activity EMA is averaged over the
data-parallel group (the expert data-parallel group for experts) and the layer mean is summed
over the tensor-parallel group, so every rank decides the same units; the new incoming rows are
drawn for the whole layer from a generator seeded by (seed, step, layer, expert), so the
result does not depend on the tensor-parallel size, and each rank writes only its own rows.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megacpp_mcore.plasticity import sharding
from megacpp_mcore.plasticity.adapter import OptimizerAdapter
from megacpp_mcore.plasticity.parts import Part, assert_decisions_agree, walk_parts
from megacpp_mcore.train.hooks import HookContext, TrainingHook


def dormant_units(activity: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask of tau-dormant units: ``activity / activity.mean() <= tau``."""
    mean = activity.float().mean()
    return activity.float() / mean.clamp_min(1e-30) <= tau


def dormant_units_reference(activity: Sequence[float], tau: float) -> list[bool]:
    """Naive oracle: the score of each unit, one by one."""
    values = [float(a) for a in activity]
    mean = sum(values) / len(values)
    return [(a / mean if mean > 0 else 0.0) <= tau for a in values]


def dormant_units_sharded(local_activity: torch.Tensor, tau: float, tp_group) -> torch.Tensor:
    """:func:`dormant_units` for the units this rank holds; the layer mean is taken over every
    unit of the tensor-parallel group."""
    total = torch.stack([local_activity.float().sum(),
                         torch.tensor(float(local_activity.numel()),
                                      device=local_activity.device)])
    sharding.all_reduce(total, tp_group)
    mean = total[0] / total[1]
    return local_activity.float() / mean.clamp_min(1e-30) <= tau


@dataclass(eq=False)
class Mlp:
    """One MLP whose hidden units are monitored (a dense F MLP or one expert)."""

    key: str
    family: str
    layer: int | None
    expert: int | None
    fc1: torch.nn.Parameter
    fc2: torch.nn.Parameter
    gated: bool
    tp_group: Any
    init_std: float
    units: int
    total: torch.Tensor = field(default=None)  # sum |h| per unit this step
    count: int = 0                              # tokens this step
    ema: torch.Tensor | None = None


def redo_targets(model_chunks: Sequence[torch.nn.Module]) -> list[Mlp]:
    """The F MLPs and experts of the chunks (from their declared parts)."""
    parts, _ = walk_parts(model_chunks)
    grouped: dict[tuple, dict[str, Part]] = {}
    for part in parts:
        if part.family in ("F", "E") and part.name in ("gate", "up", "down"):
            grouped.setdefault((part.layer, part.family, part.expert, part.module, id(
                part.tp_group)), {})[part.name] = part
    out = []
    for (layer, family, expert, kind, _), named in grouped.items():
        down = named["down"]
        units = down.param.shape[1]
        config_std = _init_std(model_chunks)
        out.append(Mlp(key=f"layer{layer}.{family}." + (f"expert{expert}" if expert is not None
                                                         else kind),
                       family=family, layer=layer, expert=expert, fc1=named["up"].param,
                       fc2=down.param, gated="gate" in named, tp_group=down.tp_group,
                       init_std=config_std, units=units))
    return out


def _init_std(model_chunks) -> float:
    for chunk in model_chunks:
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "init_method_std"):
                return float(config.init_method_std)
    return 0.02


class RedoHook(TrainingHook):
    """Activity EMA from forward pre-hooks on each ``linear_fc2``; check and recycle at
    ``start``, ``start + every``, ... (before that step's first micro-batch)."""

    name = "redo"
    goodput_bucket = "plasticity"

    def __init__(self, every: int, start: int = 1, tau: float = 0.025, beta: float = 0.1,
                 seed: int = 1234) -> None:
        self.every, self.start, self.tau, self.beta, self.seed = every, start, tau, beta, seed
        self.mlps: list[Mlp] = []
        self._handles: list[Any] = []
        self._adapter: OptimizerAdapter | None = None
        self._events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ observation

    def install(self, model_chunks, context: HookContext) -> None:
        self.mlps = redo_targets(model_chunks)
        by_fc2 = {id(m.fc2): m for m in self.mlps}
        for chunk in model_chunks:
            for module in chunk.modules():
                owned = [(name, by_fc2[id(p)]) for name, p in
                         module.named_parameters(recurse=False) if id(p) in by_fc2]
                if owned:
                    self._handles.append(module.register_forward_pre_hook(
                        self._observer(owned)))

    def _observer(self, owned: list[tuple[str, Mlp]]):
        def hook(module, inputs):
            if not module.training or not torch.is_grad_enabled():
                return
            x = inputs[0].detach()
            if len(owned) == 1 and owned[0][0] == "weight":
                pieces = [(owned[0][1], x.reshape(-1, x.shape[-1]))]
            else:  # a grouped GEMM: (x, tokens per local expert)
                splits = [int(n) for n in inputs[1]]
                chunks = x.reshape(-1, x.shape[-1]).split(splits)
                order = {name: m for name, m in owned}
                pieces = [(order[f"weight{i}"], c) for i, c in enumerate(chunks)
                          if f"weight{i}" in order]
            for mlp, h in pieces:
                total = h.abs().float().sum(0)
                mlp.total = total if mlp.total is None else mlp.total + total
                mlp.count += h.shape[0]
        return hook

    @torch.no_grad()
    def after_step(self, step, model_chunks, optimizer) -> None:
        for mlp in self.mlps:
            if mlp.count:
                mean = mlp.total / mlp.count
                mlp.ema = mean if mlp.ema is None else mlp.ema.lerp_(mean, self.beta)
            mlp.total, mlp.count = None, 0

    # ------------------------------------------------------------------ intervention

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def before_step(self, step, model_chunks, optimizer) -> None:
        if not self.due(step):
            return
        from megatron.core import parallel_state

        started = time.perf_counter()
        if self._adapter is None or self._adapter.optimizer is not optimizer:
            self._adapter = OptimizerAdapter(optimizer)
        initialised = parallel_state.model_parallel_is_initialized()
        layers, digests = [], []
        for mlp in self.mlps:
            dp = None
            if initialised:
                dp = (parallel_state.get_expert_data_parallel_group() if mlp.expert is not None
                      else parallel_state.get_data_parallel_group(with_context_parallel=True))
            device = mlp.fc2.device
            ema = mlp.ema if mlp.ema is not None else torch.zeros(mlp.units, device=device)
            seen = torch.tensor([1.0 if mlp.ema is not None else 0.0], device=device)
            ema = sharding.all_reduce(ema.clone(), dp)
            sharding.all_reduce(seen, dp)
            if float(seen) == 0:
                layers.append(self._report(mlp, 0, 0))
                continue
            ema /= seen
            dormant = dormant_units_sharded(ema, self.tau, mlp.tp_group)
            whole = sharding.gather(dormant, 0, mlp.tp_group)
            digests.append((mlp, sharding.digest(whole)))
            if whole.any():
                self._recycle(mlp, dormant, whole, step)
                layer_mean = sharding.all_reduce(ema.sum().reshape(1), mlp.tp_group) / (
                    mlp.units * sharding.size(mlp.tp_group))
                ema[dormant] = layer_mean  # a fresh unit starts at the layer's mean
            mlp.ema = ema
            n = int(whole.sum())
            layers.append(self._report(mlp, n, n))
        assert_decisions_agree(f"ReDo at step {step}", digests)
        # every rank of the expert-parallel group reaches this sum, observed or not
        [touched] = sharding.total_over_experts(
            ((r["expert"] is not None, r["recycled"]) for r in layers), width=1)
        if not digests:
            return  # nothing observed yet: no check happened
        self._events.append({"step": step, "kind": "redo", "touched": touched,
                             "seconds": time.perf_counter() - started, "tau": self.tau,
                             "layers": layers})

    def _report(self, mlp: Mlp, dormant: int, recycled: int) -> dict[str, Any]:
        return {"layer": mlp.layer, "family": mlp.family, "expert": mlp.expert,
                "checked": mlp.units * sharding.size(mlp.tp_group), "dormant": dormant,
                "recycled": recycled}

    def _recycle(self, mlp: Mlp, dormant: torch.Tensor, whole: torch.Tensor, step: int) -> None:
        """New incoming rows for the layer's dormant units (drawn for the whole layer, then
        this rank's share), zero outgoing columns, moments of exactly those entries zeroed."""
        tag = f"{self.seed}:{step}:{mlp.key}".encode()
        gen = torch.Generator().manual_seed(int(hashlib.sha256(tag).hexdigest()[:15], 16))
        fc1 = self._adapter.slot(mlp.fc1)
        w1 = fc1.full()
        n_whole = int(whole.sum())
        halves = 2 if mlp.gated else 1
        fresh = torch.randn(halves, n_whole, w1.shape[1], generator=gen) * mlp.init_std
        rank = sharding.rank(mlp.tp_group)
        positions = torch.nonzero(whole.cpu()).flatten()  # index arithmetic on the host
        mine = (positions >= rank * mlp.units) & (positions < (rank + 1) * mlp.units)
        local_units = positions[mine] - rank * mlp.units
        rows = torch.cat([local_units + h * mlp.units for h in range(halves)])
        w1[rows.to(w1.device)] = fresh[:, mine].reshape(-1, w1.shape[1]).to(w1.device)
        reset1 = torch.zeros(w1.shape, dtype=torch.bool, device=w1.device)
        reset1[rows.to(w1.device)] = True
        fc1.write(w1, reset1)
        fc2 = self._adapter.slot(mlp.fc2)
        w2 = fc2.full()
        w2[:, dormant] = 0
        reset2 = torch.zeros(w2.shape, dtype=torch.bool, device=w2.device)
        reset2[:, dormant] = True
        fc2.write(w2, reset2)

    # ------------------------------------------------------------------ bookkeeping

    def events(self):
        out, self._events = self._events, []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {m.key: m.ema.detach().cpu() for m in self.mlps if m.ema is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("ema", {})
        for mlp in self.mlps:
            if mlp.key in saved:
                mlp.ema = saved[mlp.key].to(mlp.fc2.device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

"""``megacpp bench``: native Megatron against the plugin on the same model, in one process on
one card.

Runs (each a model held for the whole benchmark, with its own fused torch AdamW):

* ``native``: Megatron's ``HybridModel`` with Megatron's TE ``hybrid_stack_spec``, the
  recipe's pattern in Megatron's symbols, and a ``TransformerConfig`` holding only the
  recipe's shapes (every other field at Megatron's default): what a Megatron user writes.
* ``plugin``: ``model.build_model(..., backend="te")`` for the same recipe.
* ``native_tuned``: native plus every stock ``TransformerConfig`` setting in which the
  plugin's config differs from native's (listed in the report as ``config_diff``) plus the
  bench's tuned settings (router fusion, CUDA graphs, micro-batch, ``--tuned-config``).
* ``plugin_tuned``: the plugin plus the same tuned settings, and the plugin's own recipe
  settings given with ``--tuned-set`` (e.g. ``model.moe.expert_gemm=torch``), which native
  cannot take; with them, every family row also times ``plugin_tuned``.

Every model gets the native model's weights (a name mapping; see :func:`map_weights`), and
the per-token losses of one batch must agree within bf16 tolerance before anything is timed:
the plugin must not be faster by computing something else. Runs alternate round by round
(warm-up, then timed steps, per run per round), so drift hits every run alike; the report
(``train.bench_report``) takes medians and per-round ratios with their spread.

A recipe with R has no native counterpart: it is timed plugin-only, against the same pattern
with every R removed and with every R replaced by M, which gives R's share of the step and
the cost of an R layer relative to an M layer in the same model.

Timing needs CUDA; the model building, weight mapping and loss check also run on CPU (with a
local stack spec), which is how they are tested.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from megacpp_mcore.errors import BenchError
from megacpp_mcore.layout import Layout, parse_pattern
from megacpp_mcore.model import ACTIVATIONS, DTYPES, build_model, padded_vocab_size
from megacpp_mcore.plan import plan_layers
from megacpp_mcore.settings.config import ModelConfig, ParallelConfig, PrecisionConfig
from megacpp_mcore.train.bench_report import (
    MAIN_RUNS,
    RoundTiming,
    RunResult,
    Spread,
    format_families,
    format_host_split,
    format_ratio,
    format_table,
    ratio_spread,
    union_length,
    verdict,
)
from megacpp_mcore.train.flops import model_flops_per_token

#: families stock Megatron builds that the per-family rows cover (R is plugin-only).
FAMILY_LETTERS = "AEMFR"
#: plugin parameter-name suffix -> Megatron's, where the plugin's modules are named otherwise
#: (the project's M mixer keeps its gated-norm weight as a plain parameter; Megatron's
#: MambaMixer holds it in an ``ExtendedRMSNorm`` submodule).
PLUGIN_TO_NATIVE_NAMES: tuple[tuple[str, str], ...] = (
    (".mixer.norm_weight", ".mixer.norm.weight"),
)
#: optimizer of every run: fused torch AdamW on the bf16 parameters (no fp32 main copy).
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchSettings:
    """What to run and how long.

    Attributes:
        rounds: alternating rounds of the main runs (each run: warm-up, then timed steps).
        warmup: untimed steps per run per round.
        steps: timed steps per run per round.
        runs: which of native, plugin, native_tuned, plugin_tuned to time.
        families: letters timed as one-family models (``family_depth`` layers of one letter),
            native against plugin ('' for none).
        family_depth: layers of the one-family models.
        family_rounds: alternating rounds of each family's runs.
        router_fusion: the tuned runs set Megatron's ``moe_router_fusion``.
        cuda_graphs: the tuned runs capture Transformer Engine CUDA graphs of these
            ``cuda_graph_modules`` (comma-separated, e.g. ``attn,mamba,moe_router``; '' none).
        tuned_micro_batch: micro-batch of the tuned runs (None: the recipe's).
        tuned_config: further stock TransformerConfig fields for the tuned runs.
        tuned_sets: recipe settings (``KEY=VALUE``) of plugin_tuned (the plugin's own,
            which native cannot take); the CLI loads them into the tuned model config.
        loss_tol: largest |mean loss difference| (nats) to any run from native.
        token_loss_tol: largest mean |per-token loss difference| (nats) from native.
        profile_steps: steps of the torch.profiler pass for GPU busy time (0: none).
        peak_tflops: the card's dense BF16 peak for MFU (None: from the card's name).
        backend: the plugin's backend (te, or auto/local).
        seed: model initialisation and token seed.
        budget_s: wall-clock seconds after which no new round or family starts (the
            session ends cleanly, with a report, inside a job's time limit).
    """

    rounds: int = 5
    warmup: int = 10
    steps: int = 30
    runs: tuple[str, ...] = MAIN_RUNS
    families: str = "AEMF"
    family_depth: int = 8
    family_rounds: int = 3
    router_fusion: bool = True
    cuda_graphs: str = ""
    tuned_micro_batch: int | None = None
    tuned_config: Mapping[str, Any] = field(default_factory=dict)
    tuned_sets: tuple[str, ...] = ()
    loss_tol: float = 0.02
    token_loss_tol: float = 0.1
    profile_steps: int = 3
    peak_tflops: float | None = None
    backend: str = "te"
    seed: int = 1234
    budget_s: float = float("inf")

    def __post_init__(self) -> None:
        problems = []
        for name in ("rounds", "steps", "family_depth", "family_rounds"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "profile_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        unknown = [r for r in self.runs if r not in MAIN_RUNS]
        if unknown or not self.runs:
            problems.append(f"runs {list(self.runs)}: accepted are {', '.join(MAIN_RUNS)} "
                            "(at least one)")
        bad = sorted(set(self.families) - set(FAMILY_LETTERS))
        if bad:
            problems.append(f"families {self.families!r}: letters {bad} are not timed per "
                            f"family; accepted: {FAMILY_LETTERS}")
        if self.tuned_micro_batch is not None and self.tuned_micro_batch < 1:
            problems.append(f"tuned_micro_batch must be at least 1, got {self.tuned_micro_batch}")
        if self.loss_tol <= 0 or self.token_loss_tol <= 0:
            problems.append("loss tolerances must be positive")
        if problems:
            raise BenchError("bench settings: " + "; ".join(problems))


# --------------------------------------------------------------------------- the two models


def native_config(layout: Layout, model: ModelConfig, precision: PrecisionConfig,
                  overrides: Mapping[str, Any] | None = None):
    """Megatron's TransformerConfig with only the recipe's settings set: native defaults.

    Every settings-table row that becomes a TransformerConfig field (for the families the
    layout uses) is set as ``model.transformer_config`` sets it, plus no linear biases (a
    property of the model); none of the plugin's other fixed choices (fusions), which stay
    at Megatron's defaults.
    """
    from types import SimpleNamespace

    from megatron.core.transformer import TransformerConfig

    from megacpp_mcore.settings.table import config_kwargs

    root = SimpleNamespace(model=model, precision=precision, parallel=ParallelConfig(),
                           layout=layout, lowered_layout=layout)
    kwargs: dict[str, Any] = config_kwargs(root, layout.letters + "".join(layout.mtp))
    kwargs["activation_func"] = ACTIVATIONS[kwargs["activation_func"]]
    kwargs["params_dtype"] = DTYPES[kwargs["params_dtype"]]
    kwargs.update(num_layers=layout.depth, add_bias_linear=False)
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def build_native(layout: Layout, model: ModelConfig, precision: PrecisionConfig, *,
                 overrides: Mapping[str, Any] | None = None, stack_spec=None):
    """Megatron's HybridModel over ``stack_spec`` (default: Megatron's TE hybrid_stack_spec)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    if layout.has("R") or layout.mtp or len(layout.stages) > 1:
        raise BenchError(f"pattern {layout.canonical}: the native model takes one stage of A, "
                         "E, M, F and G layers (no R, no '|', no '/')")
    if stack_spec is None:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        stack_spec = hybrid_stack_spec
    return HybridModel(
        config=native_config(layout, model, precision, overrides),
        hybrid_stack_spec=stack_spec,
        vocab_size=padded_vocab_size(model.vocab_size, 1),
        max_sequence_length=model.seq_length,
        hybrid_layer_pattern=plan_layers(layout, model, "native").megatron_pattern,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding,
        rotary_base=model.rotary_base,
    )


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def config_diff(config, reference) -> dict[str, dict[str, Any]]:
    """Plain-valued TransformerConfig fields where ``config`` differs from ``reference``."""
    diff = {}
    for f in fields(config):
        a, b = getattr(config, f.name, None), getattr(reference, f.name, None)
        if _plain(a) and _plain(b) and a != b:
            diff[f.name] = {"value": a, "reference": b}
    return diff


# --------------------------------------------------------------------------- same weights


@dataclass
class WeightMap:
    """Which plugin parameter takes which native parameter (same name up to known aliases,
    same shape), and what has no counterpart on either side."""

    pairs: list[tuple[str, str]]
    plugin_only: list[str]
    native_only: list[str]

    @property
    def complete(self) -> bool:
        return not self.plugin_only and not self.native_only

    def to_json(self) -> dict:
        return {"mapped": len(self.pairs), "plugin_only": self.plugin_only,
                "native_only": self.native_only,
                "renamed": [[p, n] for p, n in self.pairs if p != n]}


def native_name(plugin_name: str) -> str:
    """Megatron's name for a plugin parameter whose module is named otherwise (else itself)."""
    for plugin_suffix, native_suffix in PLUGIN_TO_NATIVE_NAMES:
        if plugin_name.endswith(plugin_suffix):
            return plugin_name[: -len(plugin_suffix)] + native_suffix
    return plugin_name


def map_weights(native: torch.nn.Module, plugin: torch.nn.Module) -> WeightMap:
    """Pair every plugin parameter with the native parameter of its name (or its known
    Megatron alias, :data:`PLUGIN_TO_NATIVE_NAMES`) and shape."""
    native_params = dict(native.named_parameters())
    pairs, plugin_only = [], []
    for name, param in plugin.named_parameters():
        other_name = name if name in native_params else native_name(name)
        other = native_params.get(other_name)
        if other is None:
            plugin_only.append(f"{name} (no native parameter {other_name})")
        elif other.shape != param.shape:
            plugin_only.append(f"{name} (shape {tuple(param.shape)} vs native "
                               f"{tuple(other.shape)})")
        else:
            pairs.append((name, other_name))
    taken = {n for _, n in pairs}
    native_only = [n for n in native_params if n not in taken]
    return WeightMap(pairs, plugin_only, native_only)


@torch.no_grad()
def copy_weights(native: torch.nn.Module, plugin: torch.nn.Module, weights: WeightMap) -> int:
    """Copy the mapped native parameters into the plugin model; returns elements copied."""
    native_params = dict(native.named_parameters())
    plugin_params = dict(plugin.named_parameters())
    copied = 0
    for plugin_name, name in weights.pairs:
        plugin_params[plugin_name].copy_(native_params[name])
        copied += plugin_params[plugin_name].numel()
    return copied


@torch.no_grad()
def token_losses(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor
                 ) -> torch.Tensor:
    """Per-token training loss (fp32, flattened) of one batch."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).float().flatten()


@dataclass
class LossCheck:
    """The same batch through native and another model holding native's weights."""

    run: str
    native_loss: float
    loss: float
    token_mean_abs_diff: float
    token_max_abs_diff: float
    before_copy_token_mean_abs_diff: float | None
    loss_tol: float
    token_loss_tol: float
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and (abs(self.loss - self.native_loss) <= self.loss_tol
                                         and self.token_mean_abs_diff <= self.token_loss_tol)

    def describe(self) -> str:
        if self.skipped:
            return f"{self.run}: same-loss check skipped: {self.skipped}"
        state = "agree" if self.passed else "DIFFER"
        before = ("" if self.before_copy_token_mean_abs_diff is None else
                  f" (before the weight copy {self.before_copy_token_mean_abs_diff:.3f})")
        return (f"{self.run}: losses {state}: native {self.native_loss:.4f}, "
                f"{self.run} {self.loss:.4f} (tol {self.loss_tol}); per-token mean |diff| "
                f"{self.token_mean_abs_diff:.4f} (tol {self.token_loss_tol}){before}, max "
                f"{self.token_max_abs_diff:.3f}")

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "passed": self.passed}


def same_weights_same_loss(run: str, native: torch.nn.Module, other: torch.nn.Module,
                           tokens: torch.Tensor, labels: torch.Tensor, *, loss_tol: float,
                           token_loss_tol: float) -> tuple[LossCheck, WeightMap]:
    """Copy native's weights into ``other`` and compare the per-token losses of one batch.

    The losses before the copy are measured too: they show the check tells different
    weights apart (at initialisation the mean loss is ~log(vocab) whatever the weights, so
    the per-token comparison is the sharp one). With parameters left unmapped the check is
    reported as skipped, naming them.
    """
    weights = map_weights(native, other)
    reference = token_losses(native, tokens, labels)
    before = token_losses(other, tokens, labels)
    copy_weights(native, other, weights)
    after = token_losses(other, tokens, labels)
    diff = (after - reference).abs()
    skipped = None
    if not weights.complete:
        skipped = ("parameters without a counterpart: "
                   + "; ".join(weights.plugin_only + [f"native {n}" for n in weights.native_only]))
    check = LossCheck(
        run=run,
        native_loss=reference.mean().item(),
        loss=after.mean().item(),
        token_mean_abs_diff=diff.mean().item(),
        token_max_abs_diff=diff.max().item(),
        before_copy_token_mean_abs_diff=(before - reference).abs().mean().item(),
        loss_tol=loss_tol,
        token_loss_tol=token_loss_tol,
        skipped=skipped,
    )
    return check, weights


# --------------------------------------------------------------------------- timing (CUDA)


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters and the optimizer's state tensors."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values()
                     if isinstance(t, torch.Tensor) and t.is_cuda)
    return total


class StepRunner:
    """One run: a model, its optimizer, its micro-batch and its fresh random tokens."""

    def __init__(self, name: str, model: torch.nn.Module, micro_batch: int, seq: int,
                 vocab: int, seed: int, flops_per_token: float, letters: str = ""):
        self.name, self.model, self.micro_batch = name, model, micro_batch
        self.letters = letters  # the block letter of each decoder layer, in order
        self.seq, self.vocab = seq, vocab
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), fused=True, **ADAMW)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.positions = torch.arange(seq, device=self.device).expand(micro_batch, seq)
        self.result = RunResult(name, micro_batch * seq, flops_per_token)
        self.graphs = None  # a TECudaGraphHelper once captured
        self.model.train()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, self.vocab, (self.micro_batch, self.seq + 1),
                               device=self.device, generator=self.generator)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step(self, tokens: torch.Tensor, labels: torch.Tensor,
             split: dict[str, float] | None = None) -> torch.Tensor:
        """One training step; ``split`` (if given) accumulates the host seconds spent
        issuing forward (with the loss), backward and the optimizer step."""
        t0 = time.perf_counter()
        loss = self.model(tokens, self.positions, None, labels=labels).float().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if split is not None:
            t3 = time.perf_counter()
            split["forward"] += t1 - t0
            split["backward"] += t2 - t1
            split["optimizer"] += t3 - t2
        return loss

    def timed_step(self) -> tuple[float, float, float, torch.Tensor]:
        """(wall ms, host-issue ms, CUDA-event span ms, loss) of one step (on CPU, where
        the bench runs only in tests, the span is the wall time)."""
        tokens, labels = self.batch()
        if not self.cuda:
            t0 = time.perf_counter()
            loss = self.step(tokens, labels)
            wall = (time.perf_counter() - t0) * 1e3
            return wall, wall, wall, loss
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        loss = self.step(tokens, labels)
        end.record()
        t_issued = time.perf_counter()
        torch.cuda.synchronize()
        t_done = time.perf_counter()
        return (t_done - t0) * 1e3, (t_issued - t0) * 1e3, start.elapsed_time(end), loss

    def run_round(self, warmup: int, steps: int) -> None:
        loss = None
        for _ in range(warmup):
            *_, loss = self.timed_step()
        if self.graphs is None and self.model.config.cuda_graph_impl == "transformer_engine":
            self.capture_graphs()
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() - resident_bytes(self.model, self.optimizer)
            torch.cuda.reset_peak_memory_stats()
        timing = RoundTiming([], [], [])
        for _ in range(steps):
            wall, host, span, loss = self.timed_step()
            timing.step_ms.append(wall)
            timing.host_ms.append(host)
            timing.span_ms.append(span)
        final = loss.item()
        if not math.isfinite(final):
            raise BenchError(f"{self.name}: non-finite loss {final}")
        if self.cuda:
            self.result.peak_bytes = max(self.result.peak_bytes,
                                         torch.cuda.max_memory_allocated() - base)
        self.result.rounds.append(timing)

    def capture_graphs(self) -> None:
        """Transformer Engine CUDA graphs of the configured modules (after warm-up)."""
        from megatron.core import num_microbatches_calculator as microbatches
        from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

        if microbatches._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
            microbatches.init_num_microbatches_calculator(0, None, self.micro_batch,
                                                          self.micro_batch, 1)
        self.graphs = TECudaGraphHelper(model=[self.model], config=self.model.config,
                                        seq_length=self.seq, micro_batch_size=self.micro_batch)
        self.graphs.create_cudagraphs()

    def profile_busy(self, steps: int) -> None:
        """GPU busy time (union of device activity) and kernel launches per step."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        batches = [self.batch() for _ in range(steps)]
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for tokens, labels in batches:
                self.step(tokens, labels)
            torch.cuda.synchronize()
        events = prof.events()
        # device activity: kernels, memcpys, memsets (not the GPU-side copies of
        # record_function ranges, which span idle time too)
        device = [(e.time_range.start, e.time_range.end) for e in events
                  if e.device_type != DeviceType.CPU
                  and not getattr(e, "is_user_annotation", False)]
        launches = sum(1 for e in events if e.device_type == DeviceType.CPU
                       and e.name.startswith(("cudaLaunch", "cuLaunch")))
        self.result.busy_ms = union_length(device) / 1e3 / steps
        self.result.launches_per_step = launches / steps
        host_ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
        host_ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        self.result.host_ops = [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps,
             "calls": e.count / steps} for e in host_ops[:HOST_OPS]]

    def host_split(self, steps: int) -> None:
        """Where the host's issue time goes, without a profiler: forward per block family
        (wall time inside each decoder layer's forward, from module hooks), the whole
        forward with the loss, backward (``backward()`` returns once the autograd engine
        has issued every kernel) and the optimizer step, in ms per step."""
        from collections import defaultdict

        layers = list(self.model.decoder.layers)
        family: dict[str, float] = defaultdict(float)
        opened: dict[int, float] = {}
        hooks = []
        for index, layer in enumerate(layers):
            letter = self.letters[index] if index < len(self.letters) else "?"
            hooks.append(layer.register_forward_pre_hook(
                lambda *_, i=index: opened.__setitem__(i, time.perf_counter())))
            hooks.append(layer.register_forward_hook(
                lambda *_, i=index, x=letter: family.__setitem__(
                    x, family[x] + time.perf_counter() - opened[i])))
        split = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        try:
            self.step(*self.batch())  # untimed: the first step after the profiler pass
            family.clear()
            for tokens, labels in [self.batch() for _ in range(steps)]:
                if self.cuda:
                    torch.cuda.synchronize()
                self.step(tokens, labels, split)
        finally:
            for hook in hooks:
                hook.remove()
        self.result.host_split = {
            **{k: v * 1e3 / steps for k, v in split.items()},
            "forward_by_family": {k: v * 1e3 / steps for k, v in sorted(family.items())}}


#: host ops (by self CPU time) each run's report lists
HOST_OPS = 12


# --------------------------------------------------------------------------- orchestration


@dataclass
class Spec:
    """How to build one run's model."""

    name: str
    layout: Layout
    native: bool
    overrides: dict[str, Any]
    micro_batch: int
    model: ModelConfig | None = None  # None: the recipe's


def tuned_overrides(settings: BenchSettings, layout: Layout) -> dict[str, Any]:
    """Stock TransformerConfig settings of the tuned runs."""
    out: dict[str, Any] = {}
    if settings.router_fusion and layout.has("E"):
        out["moe_router_fusion"] = True
    if settings.cuda_graphs:
        out.update(cuda_graph_impl="transformer_engine",
                   cuda_graph_modules=[s.strip() for s in settings.cuda_graphs.split(",")
                                       if s.strip()])
    out.update(settings.tuned_config)
    return out


def _release(runners: list) -> None:
    """Drop the runs' models and optimizers and return their memory before the next group."""
    runners.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Bench:
    """One benchmark session: builds, checks, alternates, reports (see the module doc)."""

    def __init__(self, layout: Layout, model: ModelConfig, precision: PrecisionConfig,
                 micro_batch: int, settings: BenchSettings, log: Log = print,
                 device: str = "cuda", tuned_model: ModelConfig | None = None):
        self.layout, self.model, self.precision = layout, model, precision
        self.tuned_model = tuned_model if tuned_model != model else None
        self.micro_batch, self.settings, self.log = micro_batch, settings, log
        self.device = torch.device(device)
        self.vocab = padded_vocab_size(model.vocab_size, 1)
        self.report: dict[str, Any] = {"loss_checks": [], "errors": [], "skipped": []}
        self.started = time.time()

    def over_budget(self, what: str) -> bool:
        """True (and recorded) once the session's time budget is spent."""
        if time.time() - self.started <= self.settings.budget_s:
            return False
        self.log(f"time budget of {self.settings.budget_s:.0f} s spent: skipping {what}")
        self.report["skipped"].append(what)
        return True

    # ---- building
    def build(self, spec: Spec) -> torch.nn.Module:
        if self.device.type == "cpu":
            return self._build_on_cpu(spec)
        if spec.native:
            model = build_native(spec.layout, self.model, self.precision,
                                 overrides=spec.overrides)
            return model.cuda()
        return build_model(spec.layout, spec.model or self.model, backend=self.settings.backend,
                           precision=self.precision, overrides=spec.overrides).cuda()

    def _build_on_cpu(self, spec: Spec) -> torch.nn.Module:
        """The CPU stand-in used by the tests: Megatron's own hybrid stack needs Transformer
        Engine, so "native" is Megatron's HybridModel with native_config over the plugin's
        local stack spec (the session's logic runs; its timings mean nothing)."""
        from megacpp_mcore.backend import resolve_backend
        from megacpp_mcore.cpu_support import adapt_model_for_cpu
        from megacpp_mcore.specs.stack import build_stack_spec

        if not spec.native:
            return build_model(spec.layout, spec.model or self.model, backend="local",
                               precision=self.precision, overrides=spec.overrides)
        plan = resolve_backend("local", spec.layout, moe_dispatcher=self.model.moe.token_dispatcher)
        model = build_native(spec.layout, self.model, self.precision,
                             overrides={**spec.overrides, "use_cpu_initialization": True},
                             stack_spec=build_stack_spec(spec.layout, self.model, plan))
        return adapt_model_for_cpu(model)

    def runner(self, spec: Spec, model: torch.nn.Module) -> StepRunner:
        flops = model_flops_per_token(spec.layout, self.model, vocab_size=self.vocab)
        return StepRunner(spec.name, model, spec.micro_batch, self.model.seq_length,
                          self.model.vocab_size, self.settings.seed, flops,
                          letters=spec.layout.canonical)

    def check_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=self.device).manual_seed(self.settings.seed + 1)
        tokens = torch.randint(0, self.model.vocab_size,
                               (self.micro_batch, self.model.seq_length + 1),
                               device=self.device, generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def build_group(self, specs: list[Spec], check: bool) -> list[StepRunner]:
        """Build every run; the first native one lends its weights to all others (and, with
        ``check``, each must then give native's per-token losses)."""
        runners, native = [], None
        for spec in specs:
            started = time.time()
            try:
                model = self.build(spec)
            except Exception as err:  # one run that cannot be built must not lose the others
                self.fail(spec.name, err)
                continue
            self.log(f"built {spec.name} ({spec.layout.canonical}, micro-batch "
                     f"{spec.micro_batch}) in {time.time() - started:.0f} s")
            if native is None and spec.native:
                native = model
            elif native is not None:
                tokens, labels = self.check_batch()
                result, weights = same_weights_same_loss(
                    spec.name, native, model, tokens, labels, loss_tol=self.settings.loss_tol,
                    token_loss_tol=self.settings.token_loss_tol)
                self.log(("" if check else "(family) ") + result.describe())
                if check or not result.passed:
                    self.report["loss_checks"].append(
                        {**result.to_json(), "layout": spec.layout.canonical,
                         "weights": weights.to_json()})
            runners.append(self.runner(spec, model))
        return runners

    def fail(self, name: str, err: BaseException) -> None:
        message = f"{name}: {type(err).__name__}: {err}"[:2000]
        self.log("FAILED " + message)
        self.report["errors"].append(message)

    def alternate(self, runners: list[StepRunner], rounds: int) -> None:
        """Every run once per round; the order rotates each round so no run always goes
        first (or right after the same neighbour)."""
        s = self.settings
        for r in range(rounds):
            if r and self.over_budget(f"rounds {r + 1}..{rounds} of "
                                      + ", ".join(x.name for x in runners)):
                break
            shift = r % max(1, len(runners))
            for runner in runners[shift:] + runners[:shift]:
                if runner.result.error:
                    continue
                try:
                    runner.run_round(s.warmup, s.steps)
                    last = runner.result.rounds[-1].medians()
                    self.log(f"round {r + 1}/{rounds} {runner.name}: step "
                             f"{last['step_ms']:.1f} ms, host {last['host_ms']:.1f} ms")
                except Exception as err:
                    runner.result.error = f"{type(err).__name__}: {err}"[:2000]
                    self.fail(runner.name, err)
        for runner in runners:
            if s.profile_steps and runner.cuda and not runner.result.error:
                try:
                    runner.profile_busy(s.profile_steps)
                    runner.host_split(s.profile_steps)
                except Exception as err:
                    self.fail(f"{runner.name} (profile)", err)

    # ---- the sessions
    def main_specs(self) -> list[Spec]:
        s, layout = self.settings, self.layout
        tuned = tuned_overrides(s, layout)
        tuned_mb = s.tuned_micro_batch or self.micro_batch
        if layout.has("R"):
            no_r = parse_pattern(layout.canonical.replace("R", ""))
            r_to_m = parse_pattern(layout.canonical.replace("R", "M"))
            return [Spec("plugin", layout, False, {}, self.micro_batch),
                    Spec("plugin_noR", no_r, False, {}, self.micro_batch),
                    Spec("plugin_RtoM", r_to_m, False, {}, self.micro_batch)]
        diff = self.plugin_config_diff()
        self.report["config_diff"] = diff
        specs = {
            "native": Spec("native", layout, True, {}, self.micro_batch),
            "plugin": Spec("plugin", layout, False, {}, self.micro_batch),
            "native_tuned": Spec("native_tuned", layout, True,
                                 {**{k: v["value"] for k, v in diff.items()}, **tuned}, tuned_mb),
            "plugin_tuned": Spec("plugin_tuned", layout, False, dict(tuned), tuned_mb,
                                 self.tuned_model),
        }
        wanted = list(s.runs)
        if "native" not in wanted:  # the weight donor of every other run
            wanted.insert(0, "native")
        return [specs[name] for name in MAIN_RUNS if name in wanted]

    def plugin_config_diff(self) -> dict:
        """Stock settings the plugin's TransformerConfig sets differently from native's."""
        from megacpp_mcore.model import current_parallel, model_backend, transformer_config

        plan = model_backend(self.settings.backend, self.layout, self.model)
        plugin = transformer_config(self.layout, self.model, self.precision, current_parallel(),
                                    plan)
        native = native_config(self.layout, self.model, self.precision)
        return config_diff(plugin, native)

    def run_main(self) -> list[RunResult]:
        specs = self.main_specs()
        runners = self.build_group(specs, check=True)
        self.alternate(runners, self.settings.rounds)
        results = [r.result for r in runners]
        _release(runners)
        return results

    def run_families(self) -> dict[str, list[RunResult]]:
        s, out = self.settings, {}
        for letter in s.families:
            if self.over_budget(f"family {letter}"):
                continue
            layout = parse_pattern(letter * s.family_depth)
            specs = [Spec(f"{letter} plugin", layout, False, {}, self.micro_batch)]
            if self.tuned_model is not None:
                specs.append(Spec(f"{letter} plugin_tuned", layout, False, {}, self.micro_batch,
                                  self.tuned_model))
            if letter != "R":
                specs.insert(0, Spec(f"{letter} native", layout, True, {}, self.micro_batch))
            runners = self.build_group(specs, check=False)
            self.alternate(runners, s.family_rounds)
            out[letter] = [r.result for r in runners]
            _release(runners)
        return out


def ratios(results: list[RunResult]) -> dict[str, Spread]:
    """Per-round tok/s ratios: plugin runs over native, and the R-mode comparisons."""
    most = max((len(r.rounds) for r in results), default=0)
    by = {r.name: r for r in results if r.rounds and len(r.rounds) == most}
    pairs = [("plugin / native", "plugin", "native"),
             ("plugin_tuned / native", "plugin_tuned", "native"),
             ("plugin_tuned / native_tuned", "plugin_tuned", "native_tuned"),
             ("native_tuned / native", "native_tuned", "native"),
             ("plugin_tuned / plugin", "plugin_tuned", "plugin")]
    out = {}
    for label, a, b in pairs:
        if a in by and b in by:
            out[label] = ratio_spread(by[a].round_tokens_per_s(), by[b].round_tokens_per_s())
    return out


def r_costs(results: list[RunResult]) -> dict[str, Spread]:
    """R mode: R's share of the step, and (R - none) / (M - none) per round."""
    by = {r.name: r for r in results if r.rounds}
    if not {"plugin", "plugin_noR", "plugin_RtoM"} <= set(by):
        return {}
    rounds = min(len(by[n].rounds) for n in ("plugin", "plugin_noR", "plugin_RtoM"))

    def step(name):
        return [t.medians()["step_ms"] for t in by[name].rounds[:rounds]]

    full, none, as_m = step("plugin"), step("plugin_noR"), step("plugin_RtoM")
    share = Spread(tuple((f - n) / f for f, n in zip(full, none, strict=True)))
    per_m = Spread(tuple((f - n) / (m - n) if m > n else float("nan")
                         for f, n, m in zip(full, none, as_m, strict=True)))
    return {"R share of step": share, "R layers / M layers (time)": per_m}


#: the issue's targets: ratio label -> (target, the ratio must be at most it).
TARGETS: dict[str, tuple[float, bool]] = {
    "plugin / native": (1.0, False),
    "plugin_tuned / native": (1.5, False),
    "plugin_tuned / native_tuned": (1.0, False),
    "R layers / M layers (time)": (1.2, True),
}


def run_bench(layout: Layout, model: ModelConfig, precision: PrecisionConfig, micro_batch: int,
              settings: BenchSettings, log: Log = print, device: str = "cuda",
              tuned_model: ModelConfig | None = None) -> dict[str, Any]:
    """Build, check and time everything; the report (plain JSON-ready data).

    ``tuned_model``: the model settings of plugin_tuned (the recipe with ``--tuned-set``).

    ``device="cpu"`` runs the whole session on CPU with local modules: only the tests do
    that, to exercise the session end to end; its timings mean nothing.
    """
    from megacpp_mcore.train.flops import peak_tflops

    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("megacpp bench times training steps on a CUDA GPU and none is visible "
                         "here (the CPU tests cover its building, weight mapping and loss "
                         "check)")
    started = time.time()
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(card, settings.peak_tflops)
    bench = Bench(layout, model, precision, micro_batch, settings, log, device, tuned_model)
    main = bench.run_main()
    families = bench.run_families()
    spreads = {**ratios(main), **r_costs(main)}
    report = bench.report
    report.update(
        device=card,
        peak_tflops=peak,
        layout=layout.canonical,
        micro_batch=micro_batch,
        settings={f.name: getattr(settings, f.name) for f in fields(settings)},
        runs=[r.summary(peak) for r in main],
        ratios={label: {**s.to_json(), **(
            {"target": TARGETS[label][0], "at_most": TARGETS[label][1],
             "verdict": verdict(s, *TARGETS[label])} if label in TARGETS else {})}
            for label, s in spreads.items()},
        families={letter: [r.summary(peak) for r in rows] for letter, rows in families.items()},
        wall_s=time.time() - started,
    )
    return report


def render(report: dict[str, Any]) -> str:
    """The report as text: the runs table, the ratios with their spread, the families."""
    s = report["settings"]
    peak = report["peak_tflops"]
    lines = [f"{report['device']}, peak {peak or 'unknown'} TFLOP/s (dense BF16); "
             f"{report['layout']} ({len(report['layout'])} layers), micro-batch "
             f"{report['micro_batch']}; {s['rounds']} rounds x ({s['warmup']} warm-up + "
             f"{s['steps']} timed) steps, medians", ""]
    failed = [c for c in report["loss_checks"] if not c["passed"] and not c["skipped"]]
    if failed:
        lines += ["LOSS CHECK FAILED: " + ", ".join(c["run"] for c in failed) + " compute a "
                  "different function from native; their ratios are not comparable", ""]
    lines += [format_table(report["runs"]), ""]
    for label, data in report["ratios"].items():
        spread = Spread(tuple(data["ratios"]))
        lines.append(format_ratio(label, spread, data.get("target"), data.get("at_most", False)))
    if report["families"]:
        lines += ["", format_families(report["families"], s["family_depth"])]
    host = format_host_split(report["runs"])
    if host:
        lines += ["", host]
    if report.get("config_diff"):
        diff = ", ".join(f"{k}={v['value']} (native {v['reference']})"
                         for k, v in report["config_diff"].items())
        lines += ["", f"stock settings the plugin sets unlike native defaults (native_tuned "
                  f"takes them): {diff}"]
    lines += ["", "columns: step = wall per step (synchronised); host = CPU time to issue the "
              "step (until its last call returns, syncs inside included); span = CUDA events "
              "around the step (idle gaps included); busy = union of GPU kernel time "
              "(profiler); launches = kernel launches per step (profiler); peak = this model's "
              "own peak memory"]
    for what in report.get("skipped", []):
        lines.append("SKIPPED (time budget) " + what)
    for err in report["errors"]:
        lines.append("ERROR " + err)
    return "\n".join(lines)

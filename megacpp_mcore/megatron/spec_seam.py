"""Megatron's ``--spec`` seam: the plugin's stack spec as a function of Megatron's parsed args.

:func:`stack_spec_from_args` is the seam. It reads the per-layer plan from ``--megacpp-plan``
(written by ``megacpp translate --target plugin``: the plan is carried, never re-derived from
Megatron's symbols), the settings from Megatron's and the plugin's flags, checks that
``--hybrid-layer-pattern`` spells the same plan and that the settings can build it, and
returns the stack spec. The plugin's launcher (``scripts/pretrain_nam.py``) calls it with the
args it parsed and hands the spec to Megatron's ``HybridModelConfig``.

Megatron's own launchers can only name a spec object (``--spec MODULE NAME``): they import it
and never call it, before the model is built. :data:`megacpp_stack_spec` is that object: a
``ModuleSpec`` whose ``params`` and ``submodules`` are :func:`stack_spec_from_args` applied
to Megatron's global args (once per parsed args object), so the same function is the seam
on both paths.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.errors import SpecError
from megacpp_mcore.model import model_backend, stage_problem
from megacpp_mcore.plan import ModelPlan, parse_plan
from megacpp_mcore.specs.stack import MegacppHybridStack, build_stack_spec

#: attribute ``megatron.builder.with_plugin_builder`` sets on Megatron's args when the
#: plugin's model builder (which attaches the embedding extension) builds the model; without
#: it the seam refuses the extension, which another builder would drop
BUILDER_MARK = "megacpp_plugin_builder"


def plan_from_args(args: Any) -> ModelPlan:
    """The per-layer plan carried in ``--megacpp-plan``, checked against
    ``--hybrid-layer-pattern`` (every layer's Megatron symbol must be the plan's)."""
    text = getattr(args, "megacpp_plan", None)
    if not text:
        raise SpecError("--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec needs "
                        "--megacpp-plan (the per-layer plan that `megacpp translate --target "
                        "plugin` writes) and the launcher's extra_args_provider "
                        "megacpp_mcore.megatron.args.add_megacpp_args")
    plan = parse_plan(text)
    if args.hybrid_layer_pattern != plan.megatron_pattern:
        raise SpecError(f"--hybrid-layer-pattern {args.hybrid_layer_pattern!r} does not encode "
                        f"--megacpp-plan {text!r}; expected {plan.megatron_pattern!r}")
    return plan


def stack_spec_from_args(args: Any) -> ModuleSpec:
    """The plugin's stack spec for Megatron's parsed ``args`` (``--megacpp-plan`` and the
    settings' flags); :class:`SpecError` for anything it cannot build faithfully."""
    from megacpp_mcore.megatron.args import model_config_from_args

    plan = plan_from_args(args)
    layout = plan.layout
    model = model_config_from_args(args)
    mamba = plan.variants("M")
    if mamba and mamba != {model.mamba.variant}:
        raise SpecError(f"--megacpp-plan builds M as {sorted(mamba)} but "
                        f"--megacpp-mamba-variant is {model.mamba.variant!r}")
    if model.ngram_hash.enabled and not getattr(args, BUILDER_MARK, False):
        raise SpecError(
            "--megacpp-ngram-hash: the n-gram features live on the embedding, outside the "
            "stack this --spec builds, and this launcher's model builder would drop them; "
            "train with the plugin's launcher (scripts/pretrain_nam.py, whose builder "
            "attaches them) or build_model")
    problem = stage_problem(layout, args.pipeline_model_parallel_size,
                            one_rank_builds_all=False)
    if problem:
        raise SpecError(problem)
    attention = model.attention
    if ("dsa" in plan.variants("A") and attention.dsa.indexer_loss_coeff == 0
            and getattr(args, "overlap_grad_reduce", False)):
        raise SpecError(
            "--overlap-grad-reduce with DSA and --dsa-indexer-loss-coeff 0 "
            "(model.attention.dsa.indexer_loss_coeff): without its loss nothing trains the "
            "DSA indexer (Megatron detaches its inputs), so its parameters never get a "
            "gradient, and Megatron's DDP with --overlap-grad-reduce asserts after the first "
            "iteration that every parameter of a bucket did. Give the indexer a loss "
            "(a positive coefficient) or drop --overlap-grad-reduce")
    impl = {"transformer_engine": "te", "local": "local"}.get(args.transformer_impl)
    if impl is None:
        raise SpecError(f"--transformer-impl {args.transformer_impl!r}: the plugin stack builds "
                        "transformer_engine or local")
    # --megacpp-backend is what the recipe asked for (auto may resolve to local on a machine
    # without TE); without it, --transformer-impl is taken literally.
    backend = getattr(args, "megacpp_backend", None) or impl
    # the launcher turns the rotation off where it cannot run and keeps what was asked
    backend_plan = model_backend(backend, layout, model,
                                 dsa_rotate=attention.dsa.rotate_activation
                                 or bool(getattr(args, "megacpp_dsa_rotation_asked", False)),
                                 layer_plan=plan)
    return build_stack_spec(plan.with_paths(backend_plan.paths()), model, backend_plan)


def _megatron_args() -> Any:
    from megatron.training.global_vars import get_args

    try:
        return get_args()
    except AssertionError as err:  # Megatron asserts when args were never parsed
        raise SpecError("megacpp_stack_spec reads the model from Megatron's parsed arguments, "
                        "which are not initialised; in code, call stack_spec_from_args(args) "
                        "or build_stack_spec(layer_plan, model, plan)") from err


class MegatronArgsStackSpec(ModuleSpec):
    """The object Megatron's ``--spec MODULE NAME`` imports: ``params`` and ``submodules``
    are those of :func:`stack_spec_from_args` for Megatron's global args, built once per
    parsed args object (Megatron reads them when HybridModel is built)."""

    def __init__(self) -> None:
        super().__init__(module=MegacppHybridStack)
        self._built: tuple[int, ModuleSpec] | None = None

    def resolved(self) -> ModuleSpec:
        """The stack spec for Megatron's current global args."""
        args = _megatron_args()
        if self._built is None or self._built[0] != id(args):
            self._built = (id(args), stack_spec_from_args(args))
        return self._built[1]

    # ModuleSpec's dataclass __init__ assigns both; what the seam answers comes from the args
    params = property(lambda self: self.resolved().params, lambda self, value: None)
    submodules = property(lambda self: self.resolved().submodules, lambda self, value: None)

    __eq__ = object.__eq__  # compared by identity: equal fields would mean parsing the args
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "MegatronArgsStackSpec(MegacppHybridStack, stack_spec_from_args(get_args()))"


megacpp_stack_spec = MegatronArgsStackSpec()

__all__ = ["BUILDER_MARK", "MegatronArgsStackSpec", "megacpp_stack_spec", "plan_from_args",
           "stack_spec_from_args"]

"""Megatron's ``--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec`` seam.

Megatron imports the named object and never calls it, so the stack resolves its layers from
Megatron's parsed arguments (``--megacpp-pattern`` and the plugin's other flags) on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import model_backend, stage_problem
from megacpp_mcore.settings.attention import a_variants, mtp_variant, used_variants
from megacpp_mcore.specs.stack import MegacppHybridStack, build_stack_spec
from megacpp_mcore.symbols import PLUGIN_SYMBOLS, megatron_pattern


@dataclass(eq=False, repr=False)
class MegatronArgsStackSpec(ModuleSpec):
    """A stack spec that resolves itself from Megatron's parsed arguments on first use.

    Megatron's ``--spec MODULE NAME`` imports an object and never calls it, before the model
    is known; the layers, the R settings and the backend are therefore read, once, from
    ``megatron.training.get_args()`` (registered by ``megatron_args.add_megacpp_args``) when
    HybridModel first touches ``params`` or ``submodules``.
    """

    module: Any = MegacppHybridStack
    _resolved: tuple[int, ModuleSpec] | None = field(default=None, repr=False)

    def _resolve(self) -> ModuleSpec:
        args = _megatron_args()
        if self._resolved is None or self._resolved[0] != id(args):
            self._resolved = (id(args), stack_spec_from_megatron_args(args))
        return self._resolved[1]

    def __getattribute__(self, attr: str):
        if attr in ("params", "submodules"):
            return getattr(self._resolve(), attr)
        return super().__getattribute__(attr)

    def __repr__(self) -> str:
        return "MegatronArgsStackSpec(MegacppHybridStack, resolved from Megatron's args)"


def _megatron_args():
    from megatron.training.global_vars import get_args

    try:
        return get_args()
    except AssertionError as err:  # Megatron asserts when args were never parsed
        raise SpecError("megacpp_stack_spec reads the model from Megatron's parsed arguments, "
                        "which are not initialised; in code, use build_stack_spec(layout, "
                        "model, plan)") from err


#: attribute ``megatron.builder.with_plugin_builder`` sets on Megatron's args when the
#: plugin's model builder (which attaches the embedding extension) builds the model; without
#: it the seam refuses the extension, which another builder would drop
BUILDER_MARK = "megacpp_plugin_builder"


def stack_spec_from_megatron_args(args=None) -> ModuleSpec:
    """Build the stack spec from Megatron's args (``--megacpp-pattern`` and friends)."""
    from megacpp_mcore.megatron.args import model_config_from_args

    args = args if args is not None else _megatron_args()
    pattern = getattr(args, "megacpp_pattern", None)
    if not pattern:
        raise SpecError("--spec megacpp_mcore.megatron.spec_seam megacpp_stack_spec needs "
                        "--megacpp-pattern (the layout in this project's letters) and the "
                        "launcher's extra_args_provider megacpp_mcore.megatron.args."
                        "add_megacpp_args")
    layout = parse_pattern(pattern)
    model = model_config_from_args(args)
    if model.ngram_hash.enabled and not getattr(args, BUILDER_MARK, False):
        raise SpecError(
            "--megacpp-ngram-hash: the n-gram features live on the embedding, outside the "
            "stack this --spec builds, and this launcher's model builder would drop them; "
            "train with the plugin's launcher (scripts/pretrain_nam.py, whose builder "
            "attaches them) or build_model")
    attention = model.attention
    expected = megatron_pattern(layout, PLUGIN_SYMBOLS, a_variants(layout, attention),
                                mtp_variant(attention))
    if args.hybrid_layer_pattern != expected:
        raise SpecError(f"--hybrid-layer-pattern {args.hybrid_layer_pattern!r} does not encode "
                        f"--megacpp-pattern {pattern!r}; expected {expected!r}")
    problem = stage_problem(layout, args.pipeline_model_parallel_size,
                            one_rank_builds_all=False)
    if problem:
        raise SpecError(problem)
    if ("dsa" in used_variants(layout, attention) and attention.dsa.indexer_loss_coeff == 0
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
    plan = model_backend(backend, layout, model,
                         dsa_rotate=attention.dsa.rotate_activation
                         or bool(getattr(args, "megacpp_dsa_rotation_asked", False)))
    return build_stack_spec(layout, model, plan)


megacpp_stack_spec = MegatronArgsStackSpec()

__all__ = ["MegatronArgsStackSpec", "megacpp_stack_spec", "stack_spec_from_megatron_args"]

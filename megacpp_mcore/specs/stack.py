"""The hybrid stack: for every position of a layout, the layer of its family.

``MegacppHybridStack`` is a thin subclass of Megatron's ``HybridStack``: it keeps Megatron's
forward, pipeline hand-off and checkpoint sharding, and changes only construction, because
upstream (a) has no slot for R and (b) always builds its final norm with Transformer Engine.
Here each layer is built from the exact letter of the layout (checked against the symbol
HybridModel passes, so nothing is remapped) and the final norm follows the backend.

Two ways in:

* ``build_stack_spec(layout, model, plan)`` for code: a ``ModuleSpec`` to pass to
  ``HybridModel(..., hybrid_stack_spec=...)`` with the pattern from
  ``symbols.megatron_pattern(layout, PLUGIN_SYMBOLS)``;
* ``megacpp_stack_spec``, a ready-built object for Megatron's ``--spec megacpp_mcore.specs.stack
  megacpp_stack_spec`` seam. Megatron only imports it, so it resolves its layers from
  Megatron's parsed arguments (``--megacpp-pattern``, ``--megacpp-r-*``,
  ``--transformer-impl``) the first time it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megacpp_mcore.backend import BackendPlan, resolve_backend
from megacpp_mcore.config import ModelConfig
from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layout import Layout, parse_pattern
from megacpp_mcore.specs.attention import attention_layer_spec
from megacpp_mcore.specs.gdn import gdn_layer_spec
from megacpp_mcore.specs.mamba import mamba_layer_spec
from megacpp_mcore.specs.mlp import mlp_layer_spec
from megacpp_mcore.specs.moe import moe_layer_spec
from megacpp_mcore.specs.recurrent import recurrent_layer_spec
from megacpp_mcore.symbols import PLUGIN_SYMBOLS, megatron_pattern


@dataclass
class MegacppStackSubmodules(HybridStackSubmodules):
    """Megatron's stack slots plus the plugin's R slot and a backend-specific final norm.

    The inherited slots keep Megatron's meaning, so Megatron's MTP block (which builds a
    plain HybridStack from these submodules) stays correct for A, E, M, F and G.
    """

    recurrent_layer: ModuleSpec | type = IdentityOp
    final_norm: Any = LocalNorm


#: letter -> the stack slot holding its layer spec
_SLOTS = {
    "A": "attention_layer",
    "E": "moe_layer",
    "M": "mamba_layer",
    "F": "mlp_layer",
    "R": "recurrent_layer",
    "G": "gdn_layer",
}


class MegacppHybridStack(HybridStack):
    """Megatron's HybridStack, built from the layout's letters (R included)."""

    def __init__(
        self,
        config,
        submodules: MegacppStackSubmodules,
        pre_process: bool = True,
        layer_type_list: list[str] | None = None,
        pp_layer_offset: int = 0,
        post_layer_norm: bool = True,
        post_process: bool = True,
        device=None,
        dtype=None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        layout_letters: str,
        backend_record: dict | None = None,
    ) -> None:
        # HybridStack.__init__ would build every layer by Megatron symbol and a TE final
        # norm; initialise the module base directly and set the same attributes it sets.
        MegatronModule.__init__(self, config=config)
        if pg_collection is None or layer_type_list is None:
            raise SpecError("MegacppHybridStack is built by HybridModel, which passes "
                            "pg_collection and layer_type_list")
        self.pre_process = pre_process
        self.post_layer_norm = post_layer_norm
        self.post_process = post_process
        self.is_mtp_layer = is_mtp_layer
        self.pp_group = pg_collection.pp
        self.tp_group = pg_collection.tp
        self.input_tensor = None
        self.pg_collection = pg_collection
        self.layer_type_list = layer_type_list
        self.backend_record = backend_record or {}

        letters = layout_letters[pp_layer_offset : pp_layer_offset + len(layer_type_list)]
        if len(letters) != len(layer_type_list):
            raise SpecError(f"the layout has {len(layout_letters)} layers but this pipeline "
                            f"segment asks for layers {pp_layer_offset + 1}.."
                            f"{pp_layer_offset + len(layer_type_list)}")
        self.layer_letters = letters
        self.layers = _build_layers(config, submodules, letters, layer_type_list,
                                    pp_layer_offset, pg_collection, is_mtp_layer, name)
        self.num_layers_per_pipeline_rank = len(self.layers)
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(submodules.final_norm, config=config,
                                           hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)


def _build_layers(config, submodules, letters, symbols, offset, pg_collection, is_mtp, name):
    import torch

    layers = torch.nn.ModuleList()
    for i, (letter, symbol) in enumerate(zip(letters, symbols, strict=True)):
        number = offset + i + 1
        if PLUGIN_SYMBOLS[letter] != symbol:
            raise SpecError(
                f"layer {number}: the layout says {letter!r} (Megatron symbol "
                f"{PLUGIN_SYMBOLS[letter]!r}) but HybridModel's pattern has {symbol!r}; the "
                "--hybrid-layer-pattern and the plugin's layout disagree")
        kwargs: dict[str, Any] = {
            "config": config,
            "layer_number": number,
            "pg_collection": pg_collection,
            "name": f"{name}.layers.{i}" if name is not None else None,
        }
        if letter in ("M", "R"):
            kwargs["pp_layer_offset"] = offset
        else:
            kwargs["add_layer_offset"] = False
        if letter == "A":
            kwargs.update(is_mtp_layer=is_mtp, pp_layer_offset=offset)
        layers.append(build_module(getattr(submodules, _SLOTS[letter]), **kwargs))
    return layers


# --------------------------------------------------------------------------- builders


def _mtp_block_spec(backend: str) -> ModuleSpec:
    """Megatron's MTP block (norms + projection) with the backend's modules."""
    if backend == "te":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return hybrid_stack_spec.submodules.mtp_block_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlock,
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )

    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=LocalNorm, hnorm=LocalNorm, eh_proj=ColumnParallelLinear,
            mtp_model_layer=None, layer_norm=LocalNorm,
        ),
    )
    return ModuleSpec(module=MultiTokenPredictionBlock,
                      submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[layer]))


def build_stack_submodules(layout: Layout, model: ModelConfig,
                           plan: BackendPlan) -> MegacppStackSubmodules:
    """Layer specs for every family ``layout`` uses (others stay empty)."""
    backend = plan.built
    if any(layer.letter == "R" for layer in layout.mtp_layers):
        raise SpecError(
            "R in multi-token-prediction layers is not supported: Megatron's MTP block builds "
            "its layers by Megatron symbol, and R has none. Keep R in the main pattern.")
    sub = MegacppStackSubmodules()
    if layout.has("A"):
        sub.attention_layer = attention_layer_spec(backend)
    if layout.has("E"):
        sub.moe_layer = moe_layer_spec(backend, model.moe.num_experts, model.moe.grouped_gemm)
    if layout.has("M"):
        sub.mamba_layer = mamba_layer_spec(backend, plan.path("M"), model.mamba)
    if layout.has("F"):
        sub.mlp_layer = mlp_layer_spec(backend)
    if layout.has("R"):
        sub.recurrent_layer = recurrent_layer_spec(backend, plan.path("R"), model.recurrent)
    if layout.has("G"):
        sub.gdn_layer = gdn_layer_spec(backend)
    if layout.mtp:
        sub.mtp_block_spec = _mtp_block_spec(backend)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        sub.final_norm = TENorm
    return sub


def build_stack_spec(layout: Layout, model: ModelConfig, plan: BackendPlan) -> ModuleSpec:
    """The stack spec for ``layout``: pass it to HybridModel with
    ``hybrid_layer_pattern=megatron_pattern(layout, PLUGIN_SYMBOLS)``."""
    return ModuleSpec(
        module=MegacppHybridStack,
        params={"layout_letters": layout.letters, "backend_record": plan.record()},
        submodules=build_stack_submodules(layout, model, plan),
    )


# --------------------------------------------------------------------------- --spec seam


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


def stack_spec_from_megatron_args(args=None) -> ModuleSpec:
    """Build the stack spec from Megatron's args (``--megacpp-pattern`` and friends)."""
    from megacpp_mcore.megatron_args import model_config_from_args

    args = args if args is not None else _megatron_args()
    pattern = getattr(args, "megacpp_pattern", None)
    if not pattern:
        raise SpecError("--spec megacpp_mcore.specs.stack megacpp_stack_spec needs "
                        "--megacpp-pattern (the layout in this project's letters) and the "
                        "launcher's extra_args_provider megacpp_mcore.megatron_args."
                        "add_megacpp_args")
    layout = parse_pattern(pattern)
    expected = megatron_pattern(layout, PLUGIN_SYMBOLS)
    if args.hybrid_layer_pattern != expected:
        raise SpecError(f"--hybrid-layer-pattern {args.hybrid_layer_pattern!r} does not encode "
                        f"--megacpp-pattern {pattern!r}; expected {expected!r}")
    impl = {"transformer_engine": "te", "local": "local"}.get(args.transformer_impl)
    if impl is None:
        raise SpecError(f"--transformer-impl {args.transformer_impl!r}: the plugin stack builds "
                        "transformer_engine or local")
    # --megacpp-backend is what the recipe asked for (auto may resolve to local on a machine
    # without TE); without it, --transformer-impl is taken literally.
    backend = getattr(args, "megacpp_backend", None) or impl
    model = model_config_from_args(args)
    plan = resolve_backend(backend, layout, moe_dispatcher=model.moe.token_dispatcher)
    return build_stack_spec(layout, model, plan)


megacpp_stack_spec = MegatronArgsStackSpec()

__all__ = [
    "MegacppHybridStack",
    "MegacppStackSubmodules",
    "build_stack_spec",
    "build_stack_submodules",
    "megacpp_stack_spec",
    "stack_spec_from_megatron_args",
]

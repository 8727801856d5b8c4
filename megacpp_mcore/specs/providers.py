"""The backend's modules for the spec builders: Megatron-Core's spec providers.

Every spec builder takes a provider (Megatron's ``BackendSpecProvider`` protocol) and asks it
for its linears, norms, fused norm + linear, core attention and experts:

- ``te``: Megatron's own ``TESpecProvider`` (Transformer Engine modules), exactly as stock
  Megatron's specs use it.
- ``local``: :class:`MegacppLocalSpecProvider`, Megatron's ``LocalSpecProvider`` with the
  plugin's torch norm (``layers.norm.LocalNorm``, which keeps sequence parallelism) and
  SDPA core attention (``layers.sdpa.SDPACoreAttention``); its linears and experts are
  Megatron's local ones.

:func:`provider_for` maps the backend plan's ``built`` to one. Where a family has a module
that no provider method names (DSA is built only with TE, MLA's down projections, the experts
kernel), the builder decides with :func:`is_transformer_engine`, on the provider.
"""

from __future__ import annotations

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.identity_op import IdentityOp

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.norm import LocalNorm
from megacpp_mcore.layers.sdpa import SDPACoreAttention


class MegacppLocalSpecProvider(LocalSpecProvider):
    """Megatron's local provider with the plugin's torch norm and SDPA core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False,
                   has_residual: bool = False) -> type:
        """``LocalNorm`` for every norm: it builds RMSNorm or LayerNorm from
        ``config.normalization`` (so ``rms_norm`` is not needed), and, like Megatron's local
        norms, never fuses the residual (``has_residual`` asks TE's norm only)."""
        return LocalNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


def provider_for(built: str) -> BackendSpecProvider:
    """The provider of the backend plan's ``built`` (``te`` or ``local``). Megatron's TE
    provider is imported only when ``te`` is asked."""
    if built == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if built == "local":
        return MegacppLocalSpecProvider()
    raise SpecError(f"backend {built!r} has no spec provider; accepted: te, local")


def is_transformer_engine(provider: BackendSpecProvider) -> bool:
    """Whether ``provider`` is Megatron's TE provider: the one decision for modules that no
    provider method names (each use says which)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return isinstance(provider, TESpecProvider)


def norm_and_column_linear(provider: BackendSpecProvider) -> tuple[type, type]:
    """``(norm, linear)`` for a norm followed by a column-parallel linear: where the backend
    fuses them (TE's LayerNormColumnParallelLinear), the norm slot is an identity, as in
    stock Megatron's hybrid specs; otherwise the backend's norm, then its linear."""
    if provider.fuse_layernorm_and_linear():
        return IdentityOp, provider.column_parallel_layer_norm_linear()
    return provider.layer_norm(), provider.column_parallel_linear()


__all__ = ["MegacppLocalSpecProvider", "is_transformer_engine", "norm_and_column_linear",
           "provider_for"]

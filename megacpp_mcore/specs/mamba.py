"""Letter M: Megatron's ``MambaLayer`` holding a Mamba-2 mixer.

The mixer follows the dispatcher's path: ``fused`` builds Megatron's own ``MambaMixer``
(mamba-ssm kernels, GPU), ``reference`` builds ``layers.mamba2.Mamba2Mixer`` (plain PyTorch,
the same parameters and checkpoint layout). Both take the same parameters from the recipe.
``te``: the norm is fused into the input projection (TE LayerNormColumnParallelLinear), as in
stock Megatron. ``local``: a torch norm and Megatron's local linears.
"""

from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.layers.mamba2 import Mamba2Mixer
from megacpp_mcore.settings.config import MambaConfig
from megacpp_mcore.specs.projections import mixer_layer_spec

MIXERS = {"fused": MambaMixer, "reference": Mamba2Mixer}


def mamba_layer_spec(backend: str, path: str, mamba: MambaConfig) -> ModuleSpec:
    if path not in MIXERS:
        raise ValueError(f"M mixer path {path!r}; accepted: {', '.join(MIXERS)}")
    params = {"d_conv": mamba.conv_kernel, "chunk_size": mamba.chunk_size}
    return mixer_layer_spec(backend, MIXERS[path], MambaMixerSubmodules, params)

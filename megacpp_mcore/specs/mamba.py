"""Letter M: Megatron's ``MambaLayer`` holding this project's ``Mamba2Mixer``.

``te``: the norm is fused into the input projection (TE LayerNormColumnParallelLinear), as in
stock Megatron. ``local``: a torch norm and Megatron's local linears. The mixer's scan path
(``fused`` mamba-ssm kernels or the ``reference`` PyTorch scan) comes from the dispatcher.
"""

from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.layers.mamba2 import Mamba2Mixer
from megacpp_mcore.settings.config import MambaConfig
from megacpp_mcore.specs.projections import mixer_layer_spec


def mamba_layer_spec(backend: str, path: str, mamba: MambaConfig) -> ModuleSpec:
    params = {"path": path, "conv_kernel": mamba.conv_kernel, "chunk_size": mamba.chunk_size}
    return mixer_layer_spec(backend, Mamba2Mixer, MambaMixerSubmodules, params)

"""Letter M: Megatron's ``MambaLayer`` holding a Mamba mixer, Mamba-2 or Mamba-3.

Mamba-2 follows the dispatcher's path: ``fused`` builds Megatron's own ``MambaMixer``
(mamba-ssm kernels, GPU), ``reference`` builds ``layers.mamba2.Mamba2Mixer`` (plain PyTorch,
the same parameters and checkpoint layout). Mamba-3 (``model.mamba.variant: mamba3``) builds
``layers.mamba3.Mamba3Mixer`` on either path; its MIMO form is refused with the reason.
The norm and projections come from the backend's spec provider (``specs.projections``): TE
fuses the norm into the input projection (TE LayerNormColumnParallelLinear), as in stock
Megatron; local is a torch norm and Megatron's local linears.
"""

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.mamba2 import Mamba2Mixer
from megacpp_mcore.layers.mamba3 import Mamba3Mixer
from megacpp_mcore.settings.config import MambaConfig
from megacpp_mcore.specs.projections import mixer_layer_spec

MIXERS = {"fused": MambaMixer, "reference": Mamba2Mixer}
MIMO_REFUSED = (
    "model.mamba.mimo: Mamba-3 MIMO is not built: mamba-ssm 2.3.2 runs it with TileLang "
    "kernels, and TileLang 0.1.15 fails to compile them on H200 (InternalError ... ReduceOp "
    "cannot lower a layout). Set model.mamba.mimo: false for the SISO form; the MIMO settings "
    "(mimo_rank) stay in the recipe for machines where it compiles."
)


def mamba_layer_spec(provider: BackendSpecProvider, path: str, mamba: MambaConfig) -> ModuleSpec:
    if path not in MIXERS:
        raise ValueError(f"M mixer path {path!r}; accepted: {', '.join(MIXERS)}")
    if mamba.variant == "mamba3":
        if mamba.mimo:
            raise SpecError(MIMO_REFUSED)
        params = {"path": path, "chunk_size": mamba.chunk_size,
                  "rope_fraction": mamba.rope_fraction}
        return mixer_layer_spec(provider, Mamba3Mixer, MambaMixerSubmodules, params)
    params = {"d_conv": mamba.conv_kernel, "chunk_size": mamba.chunk_size}
    return mixer_layer_spec(provider, MIXERS[path], MambaMixerSubmodules, params)

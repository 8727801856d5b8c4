"""Letter R: Megatron's ``MambaLayer`` (norm + mixer + residual) holding this project's
``RecurrentMixer`` (M2RNN). Megatron has no R; only this plugin builds it.

Projections follow the backend as for M; the scan path (``fused`` Triton kernel or
``reference`` PyTorch loop) comes from the dispatcher.
"""

from dataclasses import asdict

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.config import RecurrentConfig
from megacpp_mcore.layers.m2rnn import RecurrentMixer, RecurrentMixerSubmodules
from megacpp_mcore.specs.projections import projections


def recurrent_layer_spec(backend: str, path: str, recurrent: RecurrentConfig) -> ModuleSpec:
    norm, in_proj, out_proj = projections(backend)
    return ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=norm or IdentityOp,
            mixer=ModuleSpec(
                module=RecurrentMixer,
                params={"path": path, **asdict(recurrent)},
                submodules=RecurrentMixerSubmodules(in_proj=in_proj, out_proj=out_proj),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )

"""Letter R: Megatron's ``MambaLayer`` (norm + mixer + residual) holding this project's
``RecurrentMixer`` (M2RNN). Megatron has no R; only this plugin builds it.

Norm and projections come from the backend's spec provider as for M; the scan path (``fused``
Triton kernel or ``reference`` PyTorch loop) comes from the dispatcher.
"""

from dataclasses import asdict

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.spec_utils import ModuleSpec

from megacpp_mcore.layers.m2rnn import RecurrentMixer, RecurrentMixerSubmodules
from megacpp_mcore.settings.config import RecurrentConfig
from megacpp_mcore.specs.projections import mixer_layer_spec


def recurrent_layer_spec(provider: BackendSpecProvider, path: str,
                         recurrent: RecurrentConfig) -> ModuleSpec:
    params = {"path": path, **asdict(recurrent)}
    return mixer_layer_spec(provider, RecurrentMixer, RecurrentMixerSubmodules, params)

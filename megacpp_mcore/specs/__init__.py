"""Megatron ``ModuleSpec``s, one module per block family, and the hybrid stack.

| letter | module | builds |
| --- | --- | --- |
| A | ``specs.attention`` | Megatron ``TransformerLayer`` with ``SelfAttention`` |
| E | ``specs.moe`` | Megatron ``MoETransformerLayer`` (router + experts) |
| M | ``specs.mamba`` | Megatron ``MambaLayer`` with ``MambaMixer`` (GPU) / ``Mamba2Mixer`` (CPU) |
| F | ``specs.mlp`` | Megatron ``MLPLayer`` |
| R | ``specs.recurrent`` | Megatron ``MambaLayer`` with this project's ``RecurrentMixer`` |
| G | ``specs.gdn`` | Megatron ``TransformerLayer`` with ``GatedDeltaNet`` |

Each takes the backend decision (``te`` or ``local``) from ``megacpp_mcore.backend``;
``specs.stack`` puts them together for every position of a layout.
"""

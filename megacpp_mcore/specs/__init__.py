"""Megatron ``ModuleSpec``s, one module per block family, and the hybrid stack.

| letter | module | builds |
| --- | --- | --- |
| A | ``specs.attention`` | Megatron ``TransformerLayer`` with ``SelfAttention`` |
| E | ``specs.moe`` | Megatron ``MoETransformerLayer`` (router + experts) |
| M | ``specs.mamba`` | Megatron ``MambaLayer`` with ``MambaMixer`` (GPU) / ``Mamba2Mixer`` (CPU) |
| F | ``specs.mlp`` | Megatron ``MLPLayer`` |
| R | ``specs.recurrent`` | Megatron ``MambaLayer`` with this project's ``RecurrentMixer`` |
| G | ``specs.gdn`` | Megatron ``TransformerLayer`` with ``GatedDeltaNet`` |

Each builder takes a Megatron spec provider (``specs.providers``: Megatron's ``TESpecProvider``
for ``te``, the plugin's ``MegacppLocalSpecProvider`` for ``local``; ``provider_for(built)``
maps the backend decision of ``megacpp_mcore.backend`` to one) and asks it for its modules;
``specs.stack`` puts them together for every position of a layout.
"""

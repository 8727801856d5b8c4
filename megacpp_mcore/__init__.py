"""megacpp-mcore: a Megatron-Core plugin and spec builder for hybrid language models.

The data flow is one module per arrow (see README.md): ``layout`` (patterns) -> ``recipe``
(typed settings) -> ``specs`` (Megatron ModuleSpecs) -> ``model`` -> ``train``, and
``translate`` (native Megatron-LM flags).
"""

__version__ = "0.1.0"

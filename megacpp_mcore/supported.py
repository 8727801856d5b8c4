"""The upstream release this plugin is written against, named once.

Every message, docstring and test that depends on Megatron-Core's internals refers to
:data:`MEGATRON_CORE` (``pyproject.toml`` pins the same release line, and
``tests/test_compat.py`` checks the installed one against it), so an upgrade is one edit here
plus the source-hash pins that then fail (``tests/test_specs.py``).
"""

#: the megatron-core release whose internals the plugin's seams, workarounds and messages
#: describe
MEGATRON_CORE = "0.19.2"

"""Narrow workarounds for known upstream defects, one function each, applied explicitly.

Each names the defect and the version it targets, does the least that makes it work, and is
tested (``tests/test_compat.py``). Nothing here changes Megatron's behaviour otherwise.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from megacpp_mcore.errors import MegacppError


def megatron_core_version() -> str:
    from megatron.core.package_info import __version__

    return __version__


def dataset_makefile_missing() -> bool:
    """True when megatron.core.datasets ships without the Makefile that ``make`` needs."""
    import megatron.core.datasets as datasets

    return not (Path(datasets.__file__).parent / "Makefile").exists()


def use_shipped_dataset_helpers() -> bool:
    """Defect: the megatron-core 0.19 wheels ship the built ``helpers_cpp`` extension but
    no Makefile, and ``initialize_megatron`` runs ``make -C megatron/core/datasets`` on rank 0
    (``compile_helpers``), which fails and calls ``sys.exit(1)``.

    Workaround: when the Makefile is missing, replace ``compile_helpers`` with a function that
    imports the shipped extension (and fails loudly if that is missing too). Returns whether
    the workaround was applied; a no-op on wheels that ship the Makefile.
    """
    import megatron.core.datasets.utils as dataset_utils

    if not dataset_makefile_missing():
        return False

    def import_shipped_helpers() -> None:
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError as err:  # pragma: no cover - would be a broken wheel
            raise MegacppError(
                f"megatron-core {megatron_core_version()} ships neither the dataset helpers "
                "Makefile nor a built helpers_cpp extension; reinstall megatron-core"
            ) from err

    dataset_utils.compile_helpers = import_shipped_helpers
    return True

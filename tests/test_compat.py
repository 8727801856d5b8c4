"""The megatron-core dataset-helpers workaround (compat.use_shipped_dataset_helpers).

Each test either checks the workaround where its defect exists, checks that it stays out of
the way where the defect is gone, or skips saying which of the two this megatron-core is.
"""

import os
import subprocess

import megatron.core.datasets.utils as dataset_utils
import pytest

from megacpp_mcore.megatron import compat


def _skip_unless_defect(why: str) -> None:
    if not compat.dataset_makefile_missing():
        pytest.skip(f"megatron-core {compat.megatron_core_version()} ships the datasets "
                    f"Makefile: the defect is absent, so {why}")


def test_defect_is_present_in_megatron_0_19():
    # The workaround exists for 0.19.x wheels; if a 0.19 wheel ever ships the Makefile, this
    # test says the defect is gone (and the workaround then turns itself off).
    version = compat.megatron_core_version()
    if not version.startswith("0.19."):
        pytest.skip(f"the defect is recorded for megatron-core 0.19.x; this is {version}")
    assert compat.dataset_makefile_missing()


def test_workaround_is_a_no_op_without_the_defect(monkeypatch):
    if compat.dataset_makefile_missing():
        pytest.skip("the Makefile is missing here: the workaround applies (tested below)")
    original = dataset_utils.compile_helpers
    assert compat.use_shipped_dataset_helpers() is False
    assert dataset_utils.compile_helpers is original


def test_workaround_imports_shipped_helpers(monkeypatch):
    _skip_unless_defect("there is no workaround to apply")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(dataset_utils, "compile_helpers", dataset_utils.compile_helpers)
    assert compat.use_shipped_dataset_helpers() is True
    dataset_utils.compile_helpers()  # what initialize_megatron calls on rank 0
    assert calls == [], "the workaround must not run make"
    from megatron.core.datasets import helpers_cpp

    assert hasattr(helpers_cpp, "build_sample_idx_int64")


def test_without_workaround_make_fails():
    """The defect itself: upstream's compile_helpers cannot build without the Makefile."""
    _skip_unless_defect("upstream's make succeeds")
    folder = os.path.dirname(dataset_utils.__file__)
    result = subprocess.run(["make", "-C", folder], capture_output=True, check=False)
    assert result.returncode != 0


def test_the_supported_megatron_core_is_the_installed_and_pinned_one():
    """``supported.MEGATRON_CORE`` names the release every seam and message describes: it is
    the one installed here and inside pyproject's pin."""
    import re
    from pathlib import Path

    from megacpp_mcore.supported import MEGATRON_CORE

    # (megatron-core appends the current git commit of the working folder as a local version)
    assert compat.megatron_core_version().partition("+")[0] == MEGATRON_CORE
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pin = re.search(r'"megatron-core==([0-9.*]+)"', pyproject).group(1)
    assert MEGATRON_CORE.startswith(pin.rstrip("*"))

"""The megatron-core dataset-helpers workaround (compat.use_shipped_dataset_helpers)."""

import subprocess

import megatron.core.datasets.utils as dataset_utils

from megacpp_mcore.megatron import compat


def test_defect_is_present_in_this_megatron():
    # If a newer wheel ships the Makefile, the workaround turns itself off; this test says
    # when the defect it exists for is gone.
    if compat.megatron_core_version().startswith("0.19."):
        assert compat.dataset_makefile_missing()


def test_workaround_imports_shipped_helpers(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    original = dataset_utils.compile_helpers
    try:
        assert compat.use_shipped_dataset_helpers() is compat.dataset_makefile_missing()
        dataset_utils.compile_helpers()  # what initialize_megatron calls on rank 0
        assert calls == [], "the workaround must not run make"
        from megatron.core.datasets import helpers_cpp

        assert hasattr(helpers_cpp, "build_sample_idx_int64")
    finally:
        dataset_utils.compile_helpers = original


def test_without_workaround_make_fails():
    """The defect itself: upstream's compile_helpers cannot build without the Makefile."""
    if not compat.dataset_makefile_missing():
        return
    import os

    folder = os.path.dirname(dataset_utils.__file__)
    result = subprocess.run(["make", "-C", folder], capture_output=True, check=False)
    assert result.returncode != 0

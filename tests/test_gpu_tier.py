"""The GPU tier's gate (scripts/check_gpu_extras.py, run by ``make test-gpu``): it names every
missing extra with its pinned requirement from pyproject.toml, and refuses a machine without a
CUDA GPU. Runs on CPU: the GPU is simulated only in this script's view of torch."""

import importlib.util
import sys

import pytest
import torch

from megacpp_mcore.paths import REPO_ROOT


@pytest.fixture
def checker():
    spec = importlib.util.spec_from_file_location(
        "check_gpu_extras", REPO_ROOT / "scripts" / "check_gpu_extras.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_checked_extra_is_pinned(checker):
    pins = checker.pins()
    for _, dist, _ in checker.EXTRAS:
        assert "==" in pins[dist], f"{dist} must be pinned in pyproject.toml, got {pins[dist]}"
    assert pins["fla-core"] == "fla-core==0.6.0" and pins["tilelang"] == "tilelang==0.1.15"


def test_missing_extras_are_named_with_the_pip_line(checker, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(checker, "_import", lambda name: None if name == "mamba_ssm"
                        else f"ModuleNotFoundError: No module named '{name}'")
    assert checker.main() == 1
    out = capsys.readouterr().out
    assert "ok       mamba-ssm" in out and "MISSING  fla-core" in out
    assert (f"{sys.executable} -m pip install --no-build-isolation 'transformer-engine[pytorch]"
            "==2.20.*' 'causal-conv1d==1.7.0.*' 'fla-core==0.6.0' 'tilelang==0.1.15'") in out


def test_tilelang_is_required_only_on_hopper(checker, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    monkeypatch.setattr(checker, "_import", lambda name: None)
    assert checker.main() == 0
    assert "skip     tilelang" in capsys.readouterr().out


def test_no_gpu_fails(checker, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checker.main() == 1
    assert "a CUDA GPU visible to torch" in capsys.readouterr().out

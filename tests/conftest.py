"""Shared fixtures: a tiny model configuration, a single-process Megatron set-up, and the
frozen training corpus.

Every training run of the CPU suite reads the frozen corpus ``tests/assets/corpus`` (a fixed
snapshot of text, see ``tests/assets/README.md``), never the embedded corpus: that one is the
package's own source, so any edit of the package (a comment) would change the batches and
with them every loss and every data-dependent decision a test checks. Tests name the
:func:`frozen_corpus` fixture where they pass a dataset themselves (``data.source=path``, the
launcher's ``--data-path``); for the rest, :func:`_cpu_training_reads_the_frozen_corpus` makes
the CPU loop's ``data.source: embedded`` prepare the frozen corpus instead (``make run`` and
every command outside the tests keep the embedded corpus).
"""

import importlib.util
from pathlib import Path

import pytest

from megacpp_mcore.settings.config import MambaConfig, ModelConfig, MoEConfig, RecurrentConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_SCRIPT = ROOT / "scripts" / "make_golden_losses.py"


def tiny_model_config(**overrides) -> ModelConfig:
    """A model small enough to build, run and train on a CPU in about a second."""
    settings = dict(
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=256,
        seq_length=32,
        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=64, grouped_gemm=False),
        mamba=MambaConfig(state_dim=16, head_dim=16, num_groups=2, chunk_size=8),
        recurrent=RecurrentConfig(num_heads=4, k_head_dim=16, v_head_dim=16),
    )
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron's model-parallel state for one CPU process (gloo, world size 1)."""
    from megacpp_mcore.distributed import init_process_groups

    init_process_groups(seed=1234)
    yield


def _load_golden_script():
    spec = importlib.util.spec_from_file_location("make_golden_losses", GOLDEN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def golden_script():
    """``scripts/make_golden_losses.py`` as a module: the golden runs' settings, the frozen
    corpus' preparation and the comparison, shared by the script and the tests."""
    return _load_golden_script()


_FROZEN: dict[str, Path] = {}


def _frozen_prefix(tmp_path_factory) -> Path:
    """The frozen corpus as an indexed dataset, prepared once per session (about a second)."""
    if "prefix" not in _FROZEN:
        folder = tmp_path_factory.mktemp("frozen_corpus")
        _FROZEN["prefix"] = _load_golden_script().prepare_frozen_corpus(folder)
    return _FROZEN["prefix"]


@pytest.fixture(scope="session")
def frozen_corpus(tmp_path_factory) -> Path:
    """The prefix (``.bin``/``.idx``) of the frozen corpus ``tests/assets/corpus``, prepared
    by the project's own ``prepare_dataset``: pass it as ``data.paths`` or ``--data-path``."""
    return _frozen_prefix(tmp_path_factory)


@pytest.fixture(autouse=True)
def _cpu_training_reads_the_frozen_corpus(monkeypatch, tmp_path_factory):
    """``data.source: embedded`` on the CPU loop (``train_on_cpu``, ``megacpp train --device
    cpu`` in this process) trains on the frozen corpus; the embedded corpus' own functions
    (tests/test_data.py) are left as they are. Subprocesses are not reached: a test that
    trains in one passes ``data.source=path`` with :func:`frozen_corpus`."""
    try:
        from megacpp_mcore.train import cpu_loop
    except ImportError:  # nothing can train through it then; the test that tries will say so
        return
    monkeypatch.setattr(cpu_loop, "prepare_embedded",
                        lambda output_dir=None: _frozen_prefix(tmp_path_factory))

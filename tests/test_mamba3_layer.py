"""The Mamba-3 M variant on CPU: mamba-ssm's parameter layout, the reference scan inside the
layer, training, checkpoints, and the refusals (MIMO, tensor parallel > 1)."""

from dataclasses import replace

import pytest
import torch

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layers.mamba3 import Mamba3Mixer
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.model import build_model
from megacpp_mcore.ops.mamba3.naive import naive_mamba3_siso
from megacpp_mcore.settings.config import MambaConfig, ParallelConfig, PrecisionConfig
from megacpp_mcore.settings.sizes import size_problems
from tests.checkpoint_helpers import load, save_sync
from tests.compare import assert_close
from tests.conftest import tiny_model_config

FP32 = PrecisionConfig(params_dtype="fp32")
MAMBA3 = MambaConfig(variant="mamba3", state_dim=16, head_dim=16, num_groups=2, chunk_size=8)


def _config(**mamba):
    return tiny_model_config(seq_length=16, mamba=replace(MAMBA3, **mamba))


def test_parameters_follow_mamba_ssm_layout(megatron_single_process):
    config = _config()
    model = build_model(parse_pattern("M"), config, precision=FP32)
    mixer = model.decoder.layers[0].mixer
    assert isinstance(mixer, Mamba3Mixer) and mixer.path == "reference"
    assert "Mamba-3" in model.backend_record["families"]["M"]["reason"]
    h, n, g = 2 * config.hidden_size // 16, 16, 2
    d_inner = 2 * config.hidden_size
    expected = {  # mamba_ssm/modules/mamba3.py (2.3.2), SISO, no output norm
        "in_proj.weight": (2 * d_inner + 2 * g * n + 3 * h + n // 4, config.hidden_size),
        "dt_bias": (h,), "B_bias": (h, 1, n), "C_bias": (h, 1, n),
        "B_norm.weight": (n,), "C_norm.weight": (n,), "D": (h,),
        "out_proj.weight": (config.hidden_size, d_inner),
    }
    assert {k: tuple(p.shape) for k, p in mixer.named_parameters()} == expected
    assert [part for part, _ in mixer.fused_parts()["in_proj.weight"]] == [
        "z", "x", "B", "C", "dd_dt", "dd_A", "trap", "angles"]


def test_layer_computes_the_mamba3_recurrence(megatron_single_process, monkeypatch):
    """The mixer's inner scan equals the step-by-step oracle on the layer's own inputs."""
    config = _config()
    mixer = build_model(parse_pattern("M"), config, precision=FP32).decoder.layers[0].mixer
    captured = {}
    import megacpp_mcore.layers.mamba3 as layer_module

    def spy(**scan):
        captured.update(scan)
        return original(**scan)

    original = layer_module.mamba3_siso_reference
    monkeypatch.setattr(layer_module, "mamba3_siso_reference", spy)
    y = mixer.mix(torch.randn(2, 16, mixer.in_proj.weight.shape[0]))
    scan = {k: v for k, v in captured.items() if k != "chunk_size"}
    oracle = naive_mamba3_siso(**{k: v.double() for k, v in scan.items()})
    assert_close(y.double(), oracle.reshape(2, 16, -1), rtol=1e-4, atol=1e-5, what="mixer scan")


def test_mamba3_model_trains_and_checkpoints(megatron_single_process, tmp_path):
    from megacpp_mcore.distributed import seed_everything

    layout, config = parse_pattern("AMF"), _config()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 17), generator=gen)
    positions = torch.arange(16).expand(2, 16)
    seed_everything(3)
    model = build_model(layout, config, precision=FP32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    mixer = model.decoder.layers[1].mixer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())

    save_sync(model, tmp_path)
    seed_everything(4)
    other = build_model(layout, config, precision=FP32)
    load(other, tmp_path)
    with torch.no_grad():
        assert_close(other(tokens[:, :-1], positions, None),
                     model(tokens[:, :-1], positions, None), rtol=1e-5, atol=1e-5,
                     what="logits after loading the checkpoint")


def test_mimo_is_refused_with_the_reason(megatron_single_process):
    with pytest.raises(SpecError, match=r"TileLang 0\.1\.15 fails to compile"):
        build_model(parse_pattern("M"), _config(mimo=True), precision=FP32)


def test_mamba3_refuses_tensor_parallel():
    problems = size_problems(parse_pattern("M"), _config(), ParallelConfig(tensor=2))
    assert any("mamba3 runs at parallel.tensor 1 only" in p for p in problems)
    assert size_problems(parse_pattern("M"), _config(), ParallelConfig()) == []
    bad = size_problems(parse_pattern("M"), _config(rope_fraction=0.3), ParallelConfig())
    assert any("rope_fraction (0.3) must be 0.5 or 1.0" in p for p in bad)

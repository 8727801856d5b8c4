"""The chunked Mamba-3 SISO reference (M's Mamba-3 CPU path) against the step-by-step oracle:
outputs and every input gradient in float64."""

import pytest
import torch

from megacpp_mcore.ops.mamba3.naive import naive_mamba3_siso
from megacpp_mcore.ops.mamba3.reference import mamba3_siso_reference
from tests.compare import assert_close, compare_outputs_and_grads

NAMES = ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles", "D", "Z")


def _inputs(batch=2, length=11, heads=4, qk_heads=2, n=8, p=3, angles=2, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = torch.nn.functional.softplus(rand(batch, heads, length))
    return dict(
        Q=rand(batch, length, qk_heads, n), K=rand(batch, length, qk_heads, n),
        V=rand(batch, length, heads, p),
        ADT=-torch.rand(batch, heads, length, generator=gen, dtype=torch.float64) * dt,
        DT=dt, Trap=rand(batch, heads, length),
        Q_bias=1 + 0.1 * rand(heads, n), K_bias=1 + 0.1 * rand(heads, n),
        Angles=rand(batch, length, heads, angles), D=rand(heads), Z=rand(batch, length, heads, p),
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 16])
def test_chunked_matches_naive(chunk_size):
    inputs = _inputs()
    assert_close(mamba3_siso_reference(**inputs, chunk_size=chunk_size),
                 naive_mamba3_siso(**inputs), rtol=1e-10, atol=1e-10, what="y")


@pytest.mark.parametrize("variant", [
    dict(qk_heads=4, angles=4),  # one Q/K head per head, every pair rotated
    dict(qk_heads=1, angles=1),  # shared Q/K head (the mamba-ssm module's ngroups=1)
])
def test_shapes_and_optional_terms(variant):
    inputs = _inputs(**variant)
    for drop in ((), ("D",), ("Z",), ("D", "Z")):
        kept = {k: (None if k in drop else v) for k, v in inputs.items()}
        assert_close(mamba3_siso_reference(**kept, chunk_size=4), naive_mamba3_siso(**kept),
                     rtol=1e-10, atol=1e-10, what=f"y without {drop}")


def test_gradients_match_naive():
    inputs = _inputs(length=9)
    _, want = compare_outputs_and_grads(
        lambda **kw: mamba3_siso_reference(**kw, chunk_size=4), naive_mamba3_siso, inputs,
        ("y", *NAMES), rtol=1e-9, atol=1e-9)
    assert list(inputs) == list(NAMES)
    for name, g_ref in zip(NAMES, want[1:], strict=True):
        assert g_ref.abs().sum() > 0, name  # every input reaches the output


def test_trapezoid_mixes_current_and_previous_input():
    """lambda = 1 (Trap -> +inf) is the Euler rule: each input enters only at its own step;
    lambda = 0 shifts every input to the next step (the first output sees no input)."""
    inputs = _inputs(length=5)
    inputs.update(D=None, Z=None)
    euler = dict(inputs, Trap=torch.full_like(inputs["Trap"], 60.0))
    shifted = dict(inputs, Trap=torch.full_like(inputs["Trap"], -60.0))
    first = mamba3_siso_reference(**shifted, chunk_size=2)[:, 0]
    assert first.abs().max() < 1e-12  # exact up to the diagonal correction's rounding
    assert_close(mamba3_siso_reference(**euler, chunk_size=2), naive_mamba3_siso(**euler),
                 rtol=1e-10, atol=1e-10, what="euler y")


def test_bad_shapes_are_named():
    inputs = _inputs()
    inputs["DT"] = inputs["DT"][:, :, :-1]
    with pytest.raises(ValueError, match="Mamba-3 input DT has shape"):
        mamba3_siso_reference(**inputs)

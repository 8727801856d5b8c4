"""The chunked Mamba-3 SISO reference (M's Mamba-3 CPU path) against the step-by-step oracle:
outputs and every input gradient in float64."""

import pytest
import torch

from megacpp_mcore.ops.mamba3_naive import naive_mamba3_siso
from megacpp_mcore.ops.mamba3_reference import mamba3_siso_reference

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
    torch.testing.assert_close(mamba3_siso_reference(**inputs, chunk_size=chunk_size),
                               naive_mamba3_siso(**inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", [
    dict(qk_heads=4, angles=4),  # one Q/K head per head, every pair rotated
    dict(qk_heads=1, angles=1),  # shared Q/K head (the mamba-ssm module's ngroups=1)
])
def test_shapes_and_optional_terms(variant):
    inputs = _inputs(**variant)
    for drop in ((), ("D",), ("Z",), ("D", "Z")):
        kept = {k: (None if k in drop else v) for k, v in inputs.items()}
        torch.testing.assert_close(mamba3_siso_reference(**kept, chunk_size=4),
                                   naive_mamba3_siso(**kept), rtol=1e-10, atol=1e-10)


def test_gradients_match_naive():
    inputs = {k: v.requires_grad_() for k, v in _inputs(length=9).items()}
    weights = torch.randn(2, 9, 4, 3, dtype=torch.float64)
    out = mamba3_siso_reference(**inputs, chunk_size=4)
    grads = torch.autograd.grad((out * weights).sum(), list(inputs.values()))
    grads_ref = torch.autograd.grad((naive_mamba3_siso(**inputs) * weights).sum(),
                                    list(inputs.values()))
    assert list(inputs) == list(NAMES)
    for name, g, g_ref in zip(inputs, grads, grads_ref, strict=True):
        assert g_ref.abs().sum() > 0, name  # every input reaches the output
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=name)


def test_trapezoid_mixes_current_and_previous_input():
    """lambda = 1 (Trap -> +inf) is the Euler rule: each input enters only at its own step;
    lambda = 0 shifts every input to the next step (the first output sees no input)."""
    inputs = _inputs(length=5)
    inputs.update(D=None, Z=None)
    euler = dict(inputs, Trap=torch.full_like(inputs["Trap"], 60.0))
    shifted = dict(inputs, Trap=torch.full_like(inputs["Trap"], -60.0))
    first = mamba3_siso_reference(**shifted, chunk_size=2)[:, 0]
    assert first.abs().max() < 1e-12  # exact up to the diagonal correction's rounding
    torch.testing.assert_close(mamba3_siso_reference(**euler, chunk_size=2),
                               naive_mamba3_siso(**euler), rtol=1e-10, atol=1e-10)


def test_bad_shapes_are_named():
    inputs = _inputs()
    inputs["DT"] = inputs["DT"][:, :, :-1]
    with pytest.raises(ValueError, match="Mamba-3 input DT has shape"):
        mamba3_siso_reference(**inputs)

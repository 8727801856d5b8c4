"""The chunked SSD reference (M's CPU path) against a naive per-step recurrence."""

import pytest
import torch

from megacpp_mcore.ops.ssd.naive import naive_ssd_scan
from megacpp_mcore.ops.ssd.reference import ssd_scan_reference
from tests.compare import assert_close, compare_outputs_and_grads


def _inputs(batch=2, length=11, heads=4, groups=2, p=3, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(
        x=rand(batch, length, heads, p),
        dt=torch.nn.functional.softplus(rand(batch, length, heads)),
        A=-torch.rand(heads, generator=gen, dtype=torch.float64) * 2 - 0.1,
        B=rand(batch, length, groups, n),
        C=rand(batch, length, groups, n),
        D=rand(heads),
        initial_state=rand(batch, heads, p, n),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 16])
def test_chunked_matches_naive(chunk_size):
    inputs = _inputs()
    y, final = ssd_scan_reference(chunk_size=chunk_size, **inputs)
    y_ref, final_ref = naive_ssd_scan(**inputs)
    assert_close(y, y_ref, rtol=1e-10, atol=1e-10, what="y")
    assert_close(final, final_ref, rtol=1e-10, atol=1e-10, what="final_state")


def test_gradients_match_naive():
    inputs = _inputs(length=7)
    compare_outputs_and_grads(lambda **kw: ssd_scan_reference(chunk_size=3, **kw),
                              naive_ssd_scan, inputs, ("y", "final_state", *inputs),
                              rtol=1e-9, atol=1e-9)


def test_heads_must_group():
    inputs = _inputs(heads=3, groups=2)
    with pytest.raises(ValueError, match="multiple of B/C groups"):
        ssd_scan_reference(chunk_size=4, **inputs)

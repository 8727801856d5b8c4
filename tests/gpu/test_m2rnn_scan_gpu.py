"""The fused M2RNN scan on a CUDA GPU: parity with the reference (outputs, h_last and every
gradient), determinism, memory that stays linear in T, fp32 parity and edge shapes.

Run on the GPU machine: ``python -m pytest -m gpu tests/gpu/test_m2rnn_scan_gpu.py``.

Errors are relative Frobenius errors ``||a - b|| / ||b||`` against the reference run in
float64 on the same inputs (the bf16 inputs upcast, so both sides see identical values).
Tolerances:

* bf16 outputs and gradients (y, dq, dk, dv, df, dW): 1e-2. Each value is rounded to bf16
  once at the end (8 significant bits: about 1.7e-3 as a norm, measured), while the float32
  state and accumulation contribute <= 2e-6 (measured on CPU: the float32 reference vs the
  float64 one on these same input distributions, every shape below up to T=8192). A real
  bug (a wrong step, chunk boundary, row block or transpose) gives errors of 1e-1 or more.
* float32 results (h_last; df and dh0 when f and h0 are float32): 1e-4, about 50x the float32
  reference's own error on these inputs (W near identity, f in the layer's range: the
  recurrence contracts, so rounding does not grow with T).
* float32 inputs at a small shape: 1e-5 (the kernel measured ~2e-7 under the Triton
  interpreter; the GPU's approximate exp and division add a few float32 ulps).
"""

import math

import pytest
import torch

from megacpp_mcore.ops.m2rnn.dispatch import m2rnn_scan
from megacpp_mcore.ops.m2rnn.reference import m2rnn_scan_reference
from tests.compare import outputs_and_grads, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = ["y", "h_last", "dq", "dk", "dv", "df", "dW", "dh0"]
BF16_TOL = 1e-2
FP32_TOL = 1e-4
FP32_INPUT_TOL = 1e-5


def make_inputs(B, T, H, K, V, *, dtype=torch.bfloat16, f_kind="layer", seed=0,
                device="cuda", f_dtype=None):
    """Fresh random inputs: q, k, v ~ 0.5 N(0, 1); W = I + 0.02 N(0, 1); h0 ~ 0.5 N(0, 1)
    (float32). f:
    * "layer": the layer's forget gate, exp(-A dt) with A ~ U(1, 16) and dt log-uniform in
      [1e-3, 0.1] (values from ~0.2 to ~0.999);
    * "sigmoid": sigmoid(1.5 N(0, 1));
    * "near_one": 1 - 10^U(-4, -2), values in [0.99, 0.9999] (pass f_dtype=float32 to keep
      them: bf16 rounds most of them to 1).
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    q = randn(B, T, H, K) * 0.5
    k = randn(B, T, H, K) * 0.5
    v = randn(B, T, H, V) * 0.5
    if f_kind == "layer":
        A = 1 + 15 * rand(B, T, H)
        dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * rand(B, T, H))
        f = torch.exp(-A * dt)
    elif f_kind == "sigmoid":
        f = torch.sigmoid(1.5 * randn(B, T, H))
    elif f_kind == "near_one":
        f = 1 - 10 ** (-4 + 2 * rand(B, T, H))
    else:
        raise ValueError(f_kind)
    W = torch.eye(V, device=device) + 0.02 * randn(H, V, V)
    h0 = randn(B, H, K, V) * 0.5
    q, k, v, W = (x.to(dtype) for x in (q, k, v, W))
    return q, k, v, f.to(f_dtype or dtype), W, h0


def run(fn, inputs, gy, gh):
    """Outputs and all input gradients for the functional <y, gy> + <h_last, gh>."""
    return outputs_and_grads(fn, inputs, cotangents=(gy, gh))


def parity(inputs, *, backward_chunk=64, seed=1):
    """(fused results, float64 reference results) on the same inputs and output cotangents."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    # Cotangents representable in the output dtype, so both sides see the same values.
    gy = torch.randn(inputs[2].shape, generator=g, device="cuda").to(inputs[0].dtype)
    gh = torch.randn(inputs[5].shape, generator=g, device="cuda")
    fused = run(lambda *x: m2rnn_scan(*x, path="fused", backward_chunk=backward_chunk),
                inputs, gy, gh)
    ref = run(lambda *x: m2rnn_scan(*x, path="reference"), [x.double() for x in inputs],
              gy.double(), gh.double())
    return fused, ref


def check(fused, ref, inputs):
    names = NAMES[: len(fused)]  # no dh0 without h0
    errors = {name: rel_err(a, b) for name, a, b in zip(names, fused, ref, strict=True)}
    # dtype of each result: y in q's dtype, h_last fp32, each gradient in its input's dtype.
    dtypes = [inputs[0].dtype, torch.float32, *(x.dtype for x in inputs)]
    failures = []
    for (name, err), a, dtype in zip(errors.items(), fused, dtypes, strict=True):
        assert a.dtype == dtype, (name, a.dtype, dtype)
        tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
        if not err < tol:
            failures.append(f"{name}: {err:.2e} >= {tol:.0e}")
    print({name: f"{err:.2e}" for name, err in errors.items()})
    assert not failures, f"{failures}; all errors: {errors}"


SHAPES = {
    "small": (2, 64, 4, 64, 16),
    "recipe": (1, 4096, 16, 64, 16),
    "long": (1, 8192, 8, 64, 16),
    "k128_v32": (2, 256, 4, 128, 32),
    "k32_v16": (2, 128, 4, 32, 16),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fused_bf16_parity(shape):
    inputs = make_inputs(*SHAPES[shape], f_kind="layer")
    fused, ref = parity(inputs)
    check(fused, ref, inputs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("f_kind", ["sigmoid", "near_one"])
def test_fused_bf16_parity_forget_ranges(f_kind):
    # near_one keeps f in float32 (mixed input dtypes): a long memory, the hard case.
    f_dtype = torch.float32 if f_kind == "near_one" else None
    inputs = make_inputs(1, 2048, 4, 64, 16, f_kind=f_kind, f_dtype=f_dtype, seed=2)
    fused, ref = parity(inputs)
    check(fused, ref, inputs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backward_chunk", [1, 7, 64, 1000])
def test_fused_bf16_parity_chunk_sizes(backward_chunk):
    # Ragged last chunk (300 = 4 * 64 + 44, 42 * 7 + 6), one-step chunks, one chunk.
    inputs = make_inputs(2, 300, 3, 64, 16, seed=3)
    fused, ref = parity(inputs, backward_chunk=backward_chunk)
    check(fused, ref, inputs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1, 1, 16, 16), (3, 2, 1, 16, 16), (1, 65, 2, 256, 16),
                                   (1, 33, 2, 64, 64)])
def test_fused_edge_shapes(shape):
    inputs = make_inputs(*shape, seed=4)
    fused, ref = parity(inputs)
    check(fused, ref, inputs)


@pytest.mark.gpu
@needs_cuda
def test_fused_fp32_inputs_tight():
    inputs = make_inputs(2, 64, 4, 64, 16, dtype=torch.float32, f_kind="sigmoid", seed=5)
    fused, ref = parity(inputs, backward_chunk=16)
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, fused, ref, strict=True)}
    print({name: f"{err:.2e}" for name, err in errors.items()})
    assert all(err < FP32_INPUT_TOL for err in errors.values()), errors


@pytest.mark.gpu
@needs_cuda
def test_fused_without_h0_and_without_grad():
    q, k, v, f, W, h0 = make_inputs(2, 100, 4, 64, 16, seed=6)
    with torch.no_grad():
        y, h_last = m2rnn_scan(q, k, v, f, W, path="fused")
    y_ref, h_ref = m2rnn_scan_reference(*(x.double() for x in (q, k, v, f, W)))
    assert rel_err(y, y_ref) < BF16_TOL and rel_err(h_last, h_ref) < FP32_TOL
    # With grad and h0 absent (zeros): five gradients.
    inputs = [q, k, v, f, W]
    g = torch.Generator(device="cuda").manual_seed(11)
    gy = torch.randn(v.shape, generator=g, device="cuda").to(torch.bfloat16)
    gh = torch.randn(h0.shape, generator=g, device="cuda")
    fused = run(lambda *x: m2rnn_scan(*x, path="fused"), inputs, gy, gh)
    ref = run(lambda *x: m2rnn_scan(*x, path="reference"), [x.double() for x in inputs],
              gy.double(), gh.double())
    assert len(fused) == 7
    check(fused, ref, inputs)


@pytest.mark.gpu
@needs_cuda
def test_fused_non_contiguous_inputs():
    q, k, v, f, W, h0 = make_inputs(2, 64, 4, 64, 16, seed=7)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not qt.is_contiguous()
    a = m2rnn_scan(qt, k, v, f, W, h0, path="fused")
    b = m2rnn_scan(q, k, v, f, W, h0, path="fused")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@needs_cuda
def test_fused_is_deterministic():
    inputs = make_inputs(1, 1024, 8, 64, 16, seed=8)
    g = torch.Generator(device="cuda").manual_seed(9)
    gy = torch.randn(inputs[2].shape, generator=g, device="cuda").to(torch.bfloat16)
    gh = torch.randn(inputs[5].shape, generator=g, device="cuda")
    fused = lambda *x: m2rnn_scan(*x, path="fused")  # noqa: E731
    first = run(fused, inputs, gy, gh)
    second = run(fused, inputs, gy, gh)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs"


def _fwd_bwd_extra_bytes(T, H=8, K=64, V=16):
    """Peak memory of one fused forward + backward above what was allocated before it."""
    inputs = make_inputs(1, T, H, K, V, seed=10)
    xs = [x.requires_grad_(True) for x in inputs]
    gy = torch.randn(1, T, H, V, device="cuda").to(torch.bfloat16)
    gh = torch.randn(1, H, K, V, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y, h_last = m2rnn_scan(*xs, path="fused")
    grads = torch.autograd.grad((y, h_last), xs, (gy, gh))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del y, h_last, grads
    return extra


@pytest.mark.gpu
@needs_cuda
def test_fused_memory_is_linear_without_per_step_state():
    H, K, V = 8, 64, 16
    _fwd_bwd_extra_bytes(256)  # compile / warm the allocator
    extra_4k = _fwd_bwd_extra_bytes(4096)
    extra_8k = _fwd_bwd_extra_bytes(8192)
    per_step_states = 1 * 8192 * H * K * V * 4  # what saving every fp32 state would cost
    print(f"extra 4k {extra_4k / 2**20:.1f} MiB, 8k {extra_8k / 2**20:.1f} MiB, "
          f"per-step states at 8k {per_step_states / 2**20:.1f} MiB")
    # Expected ~0.2x: y, dq, dk, dv partials and T/64 boundary states, all O(T * K) or less.
    assert extra_8k < 0.35 * per_step_states
    # Linear in T: doubling T at most doubles it (plus a small constant: scratch, dW).
    assert extra_8k < 2 * extra_4k + 8 * 2**20

"""The M2RNN scan op on CPU: the reference against an independent naive loop, gradcheck, the
dispatcher's errors, and the fused Triton kernel under the Triton CPU interpreter."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megacpp_mcore.ops.m2rnn.dispatch import m2rnn_scan
from megacpp_mcore.ops.m2rnn.naive import naive_m2rnn_scan
from megacpp_mcore.ops.m2rnn.reference import m2rnn_scan_reference
from tests.compare import assert_close, compare_outputs_and_grads, outputs_and_grads

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(B, T, H, K, V, *, seed=0, dtype=torch.float64, shared=False):
    """Random scan inputs; ``shared`` gives q and k one head read by all H heads."""
    g = torch.Generator().manual_seed(seed)
    HQ = 1 if shared else H
    q = torch.randn(B, T, HQ, K, generator=g) * 0.5
    k = torch.randn(B, T, HQ, K, generator=g) * 0.5
    v = torch.randn(B, T, H, V, generator=g) * 0.5
    f = torch.sigmoid(torch.randn(B, T, H, generator=g) * 2)
    W = torch.eye(V) + 0.1 * torch.randn(H, V, V, generator=g)
    h0 = torch.randn(B, H, K, V, generator=g) * 0.5
    return [x.to(dtype) for x in (q, k, v, f, W, h0)]


NAMES = ["y", "h_last", "dq", "dk", "dv", "df", "dW", "dh0"]


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 3), (1, 1, 1, 2, 2), (3, 4, 2, 5, 1)])
def test_reference_matches_naive_loop(shape):
    got, _ = compare_outputs_and_grads(m2rnn_scan_reference, naive_m2rnn_scan, make_inputs(*shape),
                                       NAMES, rtol=1e-10, atol=1e-12)
    assert all(a.dtype == torch.float64 for a in got)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 3), (1, 3, 51, 2, 2)])
def test_reference_matches_naive_loop_with_shared_qk(shape):
    inputs = make_inputs(*shape, shared=True)
    assert inputs[0].shape[2] == 1 and inputs[2].shape[2] == shape[2]
    got, _ = compare_outputs_and_grads(m2rnn_scan_reference, naive_m2rnn_scan, inputs, NAMES,
                                       rtol=1e-10, atol=1e-12)
    assert got[2].shape == inputs[0].shape and got[3].shape == inputs[1].shape  # dq, dk


def test_shared_qk_is_the_per_head_scan_with_copies():
    """Shared q/k equals the per-head scan given H copies of the one head; its gradient is
    the sum of the copies' gradients."""
    q, k, v, f, W, h0 = make_inputs(2, 4, 3, 4, 2, shared=True)
    shared = outputs_and_grads(m2rnn_scan_reference, [q, k, v, f, W, h0])
    copies = [q.expand(2, 4, 3, 4).clone(), k.expand(2, 4, 3, 4).clone(), v, f, W, h0]
    per_head = outputs_and_grads(m2rnn_scan_reference, copies)
    assert_close(shared[0], per_head[0], what="y")
    assert_close(shared[2], per_head[2].sum(2, keepdim=True), what="dq")
    assert_close(shared[3], per_head[3].sum(2, keepdim=True), what="dk")


def test_reference_without_h0_starts_from_zeros():
    inputs = make_inputs(2, 4, 2, 3, 2)
    zeros = torch.zeros_like(inputs[5])
    got = outputs_and_grads(lambda *x: m2rnn_scan_reference(*x, None), inputs[:5])
    want = outputs_and_grads(naive_m2rnn_scan, [*inputs[:5], zeros])[:7]
    assert len(got) == 7
    for name, a, b in zip(NAMES, got, want, strict=False):
        assert_close(a, b, rtol=1e-10, atol=1e-12, what=name)


def test_reference_gradcheck():
    inputs = [x.requires_grad_(True) for x in make_inputs(1, 3, 2, 3, 2, seed=3)]
    assert torch.autograd.gradcheck(m2rnn_scan_reference, inputs, eps=1e-6, atol=1e-7)


def test_reference_dtypes():
    q, k, v, f, W, h0 = make_inputs(1, 3, 2, 4, 2, dtype=torch.bfloat16)
    y, h_last = m2rnn_scan_reference(q, k, v, f, W)
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    y, h_last = m2rnn_scan_reference(q, k, v, f, W.double(), h0)
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.float64
    y64, _ = m2rnn_scan(*(x.double() for x in (q, k, v, f, W, h0)), path="reference")
    assert_close(y, y64.to(torch.bfloat16), rtol=0, atol=0, what="bf16 y")


def test_reference_rejects_bad_shapes():
    q, k, v, f, W, h0 = make_inputs(2, 3, 2, 4, 2)
    with pytest.raises(ValueError, match=r"W must be \[H, V, V\]"):
        m2rnn_scan_reference(q, k, v, f, W[:1])
    with pytest.raises(ValueError, match="f must be"):
        m2rnn_scan_reference(q, k, v, f[:, :2], W)
    with pytest.raises(ValueError, match="h0 must be"):
        m2rnn_scan_reference(q, k, v, f, W, h0[:1])
    with pytest.raises(ValueError, match="k must have q's shape"):
        m2rnn_scan_reference(q, k[:, :, :1], v, f, W)
    with pytest.raises(ValueError, match="floating-point"):
        m2rnn_scan_reference(q, k, v, f.long(), W)


def test_dispatcher_rejects_unknown_path():
    inputs = make_inputs(1, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="accepted: reference, fused"):
        m2rnn_scan(*inputs, path="triton")


def test_dispatcher_fused_needs_cuda():
    inputs = make_inputs(1, 2, 1, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="fused path needs CUDA"):
        m2rnn_scan(*inputs, path="fused")


def test_fused_rejects_unsupported_inputs():
    pytest.importorskip("triton")
    from megacpp_mcore.ops.m2rnn.fused import m2rnn_scan_fused

    def run(B=1, T=4, H=1, K=16, V=16, dtype=torch.float32, **kw):
        q, k, v, f, W, h0 = make_inputs(B, T, H, K, V, dtype=dtype)
        return m2rnn_scan_fused(q, k, v, f, W, h0, **kw)

    with pytest.raises(ValueError, match=r"K=48 is not supported"):
        run(K=48)
    with pytest.raises(ValueError, match=r"V=8 is not supported"):
        run(V=8)
    with pytest.raises(ValueError, match="float64"):
        run(dtype=torch.float64)
    with pytest.raises(ValueError, match="backward_chunk"):
        run(backward_chunk=0)
    with pytest.raises(ValueError, match="needs CUDA"):  # CPU without the interpreter
        run()


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from megacpp_mcore.ops.m2rnn.fused import ScanKernelConfig, m2rnn_scan_fused
    from megacpp_mcore.ops.m2rnn.reference import m2rnn_scan_reference
    from tests.compare import outputs_and_grads, rel_err
    sys.path.insert(0, sys.argv[1])
    from test_m2rnn_scan import NAMES, make_inputs

    cases = [  # (B, T, H, K, V, chunk, with_h0, config, shared q/k)
        (1, 9, 2, 16, 16, 4, True, None, False),
        (1, 9, 2, 16, 16, 4, False, None, False),
        (2, 7, 1, 32, 16, 3, True, ScanKernelConfig(block_rows=16, use_dot=False), False),
        (1, 5, 1, 32, 32, 8, True, ScanKernelConfig(block_rows=32), False),
        (2, 7, 3, 16, 16, 3, True, None, True),
        (1, 6, 5, 32, 16, 4, False, ScanKernelConfig(block_rows=16), True),
    ]
    report = []
    for B, T, H, K, V, chunk, with_h0, config, shared in cases:
        inputs = make_inputs(B, T, H, K, V, dtype=torch.float32, shared=shared)
        if not with_h0:
            inputs = inputs[:5]
        fused = outputs_and_grads(
            lambda *x: m2rnn_scan_fused(*x, backward_chunk=chunk, config=config), inputs)
        again = outputs_and_grads(
            lambda *x: m2rnn_scan_fused(*x, backward_chunk=chunk, config=config), inputs)
        ref = outputs_and_grads(m2rnn_scan_reference, [x.double() for x in inputs])
        report.append({
            "case": [B, T, H, K, V, chunk, with_h0, repr(config), shared],
            "shapes": [list(x.shape) for x in fused],
            "dtypes": [str(x.dtype) for x in fused],
            "rel": {n: rel_err(a, b) for n, a, b in zip(NAMES, fused, ref)},
            "deterministic": all(torch.equal(a, b) for a, b in zip(fused, again)),
        })
    print(json.dumps(report))
""")


def test_fused_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT, str(ROOT / "tests")],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 6
    assert [c["case"][-1] for c in report].count(True) == 2
    for case in report:
        if case["case"][-1]:  # shared q/k: dq, dk keep the one shared head
            assert case["shapes"][2][2] == 1 and case["shapes"][3][2] == 1, case
        # float32 kernel vs float64 reference over <= 9 steps: float32 rounding only.
        for name, err in case["rel"].items():
            assert err < 1e-5, (case["case"], name, err)
        assert case["dtypes"][0] == "torch.float32" and case["dtypes"][1] == "torch.float32"
        assert case["deterministic"], case["case"]

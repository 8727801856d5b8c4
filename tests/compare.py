"""The comparison helpers every test uses, CPU and GPU alike (``tests/gpu/conftest.py``
re-exports them): one relative error, two assertions, and outputs-and-gradients of a callable.

* ``rel_err(a, b)``: ``||a - b|| / ||b||`` (Frobenius, float64), the GPU tier's measure;
* ``assert_close_rel(actual, expected, limit, what)``: that error below ``limit``;
* ``assert_close(actual, expected, rtol=, atol=, what=)``: element-wise, as
  ``torch.testing.assert_close`` (dtype and shape must match too);
* ``outputs_and_grads(fn, inputs)``: fn's outputs and the gradient of every input for one
  linear functional of the outputs; ``compare_outputs_and_grads(fn, oracle, inputs, names)``
  runs it on both callables and compares every result by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, limit: float,
                     what: str = "") -> float:
    """Fail unless ``rel_err(actual, expected) < limit`` (shapes equal); return the error."""
    shapes = tuple(actual.shape), tuple(expected.shape)
    assert shapes[0] == shapes[1], f"{what}: shape {shapes[0]} != {shapes[1]}"
    err = rel_err(actual, expected)
    assert err < limit, f"{what}: relative error {err:.2e} >= {limit:.0e}"
    return err


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None,
                 atol: float | None = None, what: str = "") -> None:
    """Element-wise ``|actual - expected| <= atol + rtol |expected|``, same dtype and shape
    (``rtol`` and ``atol`` both given, or both None: torch's defaults for the dtype)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda message: f"{what}: {message}" if what else message)


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                      *, cotangents: Sequence[torch.Tensor] | None = None,
                      seed: int = 1) -> list[torch.Tensor]:
    """``[*outputs, *grads]``: ``fn``'s outputs (one tensor or a tuple) and the gradient of
    every input, all detached.

    ``inputs`` is a sequence (``fn(*inputs)``) or a mapping (``fn(**inputs)``; gradients in
    its order); fresh leaf copies are differentiated, the caller's tensors are left alone.
    The gradients are those of ``sum_i <out_i, c_i>`` for the given ``cotangents`` or, when
    None, ``c_i ~ N(0, 1)`` drawn on the CPU in float32 from ``seed``, one per output in order,
    then cast to the output's dtype and device (so both sides of a comparison see the same).
    """
    named = isinstance(inputs, Mapping)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in
              (inputs.items() if named else enumerate(inputs))}
    out = fn(**leaves) if named else fn(*leaves.values())
    outs = list(out) if isinstance(out, tuple | list) else [out]
    if cotangents is None:
        gen = torch.Generator().manual_seed(seed)
        cotangents = [torch.randn(o.shape, generator=gen) for o in outs]
    assert len(cotangents) == len(outs), f"{len(cotangents)} cotangents for {len(outs)} outputs"
    cotangents = [c.to(o.device, o.dtype) for c, o in zip(cotangents, outs, strict=True)]
    grads = torch.autograd.grad(outs, list(leaves.values()), cotangents)
    return [o.detach() for o in outs] + list(grads)


def compare_outputs_and_grads(fn: Callable, oracle: Callable, inputs, names: Sequence[str], *,
                              oracle_inputs=None, rtol: float | None = None,
                              atol: float | None = None, limit: float | None = None,
                              seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and every input gradient of ``fn`` against ``oracle``'s (``oracle_inputs``, or
    the same ``inputs``; the same cotangents), compared by name: element-wise with
    ``rtol``/``atol``, or by relative error below ``limit``. Returns both result lists."""
    assert (limit is None) != (rtol is None or atol is None), "give rtol and atol, or limit"
    got = outputs_and_grads(fn, inputs, seed=seed)
    want = outputs_and_grads(oracle, inputs if oracle_inputs is None else oracle_inputs,
                             seed=seed)
    assert len(got) == len(want) == len(names), (len(got), len(want), list(names))
    for name, a, b in zip(names, got, want, strict=True):
        if limit is None:
            assert_close(a, b, rtol=rtol, atol=atol, what=name)
        else:
            assert_close_rel(a, b, limit, name)
    return got, want

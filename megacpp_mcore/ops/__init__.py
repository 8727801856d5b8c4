"""Kernels and their plain-PyTorch references (flash-linear-attention's ``ops`` tier).

One folder per op, ``ops/<op>/``, its files named by role, the same in every op (a file is
there only where the op has that role):

* ``naive.py``: the oracle, ``naive_<fn>``: the op written from its definition, one step (or
  sample) at a time with plain loops; slow, run in float64 by the tests. It imports only
  torch and math, never the code it checks (``tests/test_ops_layout.py`` holds that).
* ``reference.py``: ``<fn>_reference``, plain PyTorch (vectorised or chunked) on any device,
  autograd through torch ops: the CPU path (path ``reference``) and the fused path's truth.
* ``fused.py``: ``<fn>_fused``, fused GPU kernels (Triton) with the reference's contract
  (path ``fused``).
* ``checks.py``: input checks every path of the op shares.
* ``dispatch.py``: ``<fn>(..., path=...)``, the one place a path is chosen (no fallback).
* ``__init__.py``: what the op computes and which files it has (no code).

The ops: ``ssd`` (Mamba-2 SSD scan: naive, reference), ``mamba3`` (Mamba-3 SISO scan: naive,
reference; its fused path is mamba-ssm's kernel), ``m2rnn`` (the R mixer's scan: naive,
reference, fused, checks, dispatch) and ``stp`` (naive only: the loss it checks is
``megacpp_mcore/stp.py``). Parity tests: ``tests/test_<op>*.py`` on CPU, ``tests/gpu/`` on GPU,
both through ``tests/compare.py``.
"""

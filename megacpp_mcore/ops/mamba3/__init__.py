"""Mamba-3 SISO scan (the M mixer's Mamba-3 variant).

* ``naive.py``: ``naive_mamba3_siso``, the oracle (one step at a time);
* ``reference.py``: ``mamba3_siso_reference``, chunked plain PyTorch on ``ssd``'s
  ``chunked_scan`` (path ``reference``). The fused path is mamba-ssm's own kernel.
"""

"""Mamba-2 SSD scan (the M mixer's CPU path).

* ``naive.py``: ``naive_ssd_scan``, the oracle (one step at a time);
* ``reference.py``: ``ssd_scan_reference`` and the ``chunked_scan`` it and Mamba-3 share
  (path ``reference``). The fused path is Megatron's own ``MambaMixer`` (mamba-ssm kernels).
"""

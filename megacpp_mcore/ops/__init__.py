"""Kernels and their plain-PyTorch references (the flash-linear-attention ``ops`` tier).

Each op has a reference that runs anywhere (CPU included) and, where it pays, a fused GPU
version with the same signature; parity tests hold them together.
"""

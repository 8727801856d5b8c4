"""Typed settings, the one table of settings, and YAML recipes (pure Python)."""

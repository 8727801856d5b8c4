"""Run receipts: :mod:`.writer` (schema, writing, loading) and :mod:`.analysis` (show,
compare, plot)."""

from megacpp_mcore.receipt.writer import Goodput, Receipt, load_receipt

__all__ = ["Goodput", "Receipt", "load_receipt"]

"""Run receipts: :mod:`.writer` (schema, writing, loading) and :mod:`.analysis` (show,
compare, plot)."""

from megacpp_mcore.receipt.writer import (
    Goodput,
    Receipt,
    Terminated,
    load_receipt,
    receipt_destination,
    sigterm_raises,
)

__all__ = ["Goodput", "Receipt", "Terminated", "load_receipt", "receipt_destination",
           "sigterm_raises"]

"""The project's own error types.

Every rejection of user input is a ``ValueError`` subclass from here, so callers (the CLI,
tests, launchers) can tell "your input is wrong" apart from a bug, and the message always
says what was wrong, where, and what is accepted.
"""


class MegacppError(ValueError):
    """Base class: bad input or a request this project cannot build faithfully."""


class PatternError(MegacppError):
    """A layer pattern (or a pattern family) is malformed or cannot be tiled to the depth."""


class RecipeError(MegacppError):
    """A recipe file or override is malformed, mistyped or self-contradictory."""


class SpecError(MegacppError):
    """A layout/config cannot be built into Megatron modules on this machine or setting."""


class TranslateError(MegacppError):
    """A recipe cannot be expressed for the requested translation target."""


class DataError(MegacppError):
    """Training data is missing, empty or of the wrong kind."""


class ReceiptError(MegacppError):
    """A receipt file is missing, unreadable or not a receipt."""


class BenchError(MegacppError):
    """A benchmark request is malformed or cannot be measured faithfully here."""


class PlasticityError(MegacppError):
    """A plasticity tool (FIRE, DASH, ReDo) cannot act faithfully on this model, optimizer or
    parallel set-up, or the ranks decided differently."""

"""Where the project's data lives: ``patterns/`` and ``recipes/`` at the repository root.

The package is used from a checkout (``pip install -e .``, or ``PYTHONPATH`` on the GPU
machine), so the data folders are found next to the package, never copied into it.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PATTERNS_DIR = REPO_ROOT / "patterns"
RECIPES_DIR = REPO_ROOT / "recipes"

"""Check that this Python can run the GPU test tier; say exactly what to install if not.

``make test-gpu`` runs this first. It needs a CUDA GPU visible to torch and the GPU extras
pinned in pyproject.toml (``gpu``: mamba-ssm, causal-conv1d, fla-core, and TileLang on Hopper;
``te``: Transformer Engine). Each is imported for real (an installed-but-broken package, such
as Transformer Engine's meta package without its core, counts as missing). Prints one line per
requirement; exits 0 when all are there, 1 with the ``pip install`` line otherwise.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (import name, distribution pinned in pyproject's gpu/te extras, what needs it)
EXTRAS = [
    ("transformer_engine.pytorch", "transformer-engine", "Transformer Engine layers (backend te)"),
    ("mamba_ssm", "mamba-ssm", "fused Mamba-2 scan (M)"),
    ("causal_conv1d", "causal-conv1d", "fused causal conv (M)"),
    ("fla", "fla-core", "Gated DeltaNet kernels (G)"),
    ("tilelang", "tilelang", "Gated DeltaNet backward on Hopper (G)"),
]


def pins() -> dict[str, str]:
    """Distribution name -> its pinned requirement from pyproject.toml's extras."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    out = {}
    for requirement in (r for name in ("gpu", "te") for r in extras[name]):
        name = requirement.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip()
        out[name] = requirement
    return out


def _import(name: str) -> str | None:
    """None if ``name`` imports, else why not (one line)."""
    try:
        importlib.import_module(name)
    except Exception as err:  # ImportError, or a broken build raising anything else
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
    return None


def main() -> int:
    try:
        import torch
    except ImportError:
        print("torch is not installed in this Python; install the project first: "
              f"{sys.executable} -m pip install -e '.[dev]'")
        return 1
    print(f"python {sys.executable}\ntorch {torch.__version__} (CUDA build: "
          f"{torch.version.cuda or 'none'})")
    if not torch.cuda.is_available():
        print("MISSING  a CUDA GPU visible to torch (torch.cuda.is_available() is False): the "
              "GPU tier needs an NVIDIA GPU, its driver and a CUDA build of torch")
        return 1
    major, minor = torch.cuda.get_device_capability()
    hopper = major == 9
    print(f"gpu      {torch.cuda.get_device_name()} (sm_{major}{minor})")
    pinned = pins()
    missing = []
    for module, dist, why in EXTRAS:
        if module == "tilelang" and not hopper:
            print(f"skip     {dist:<20} only needed on Hopper (sm_90) GPUs")
            continue
        problem = _import(module)
        print(f"{'ok' if problem is None else 'MISSING':<8} {dist:<20} {why}"
              + ("" if problem is None else f"  [{problem}]"))
        if problem is not None:
            missing.append(pinned[dist])
    if missing:
        quoted = " ".join(f"'{r}'" for r in missing)
        print("\nInstall the missing GPU extras (pinned in pyproject.toml) into this Python:\n"
              f"  {sys.executable} -m pip install setuptools wheel packaging ninja\n"
              f"  {sys.executable} -m pip install --no-build-isolation {quoted}\n"
              "or all of them with the project:\n"
              f"  {sys.executable} -m pip install --no-build-isolation -e '.[gpu,te]'\n"
              "(mamba-ssm, causal-conv1d and Transformer Engine compile against the installed "
              "torch: they need the CUDA toolkit, nvcc, matching torch's CUDA version)")
        return 1
    print("all GPU extras import")
    return 0


if __name__ == "__main__":
    sys.exit(main())

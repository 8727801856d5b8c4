"""The backend dispatcher: one place that decides what builds each block family.

``auto`` picks Transformer Engine when it imports and CUDA is present, else the local
backend (Megatron's own linears, torch norms, SDPA attention). Independently, the mixers this
project owns choose their scan path: the fused GPU kernels (mamba-ssm for M, the project's
Triton scan for R) where CUDA and the kernels are present, the PyTorch reference otherwise.
Every decision is recorded (requested, built, path, why) and that record travels with the
model into receipts. Nothing falls back silently: an explicit ``te`` that cannot be honoured,
or a family that cannot be built here at all (G without flash-linear-attention and CUDA),
is a :class:`SpecError` naming the layers and the way out.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, replace

import torch

from megacpp_mcore.errors import SpecError
from megacpp_mcore.layout import FAMILIES, Layout
from megacpp_mcore.ops.m2rnn.checks import fused_head_dims_problem
from megacpp_mcore.supported import MEGATRON_CORE

BACKENDS = ("auto", "te", "local")


def have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def have_transformer_engine() -> bool:
    """TE is usable only if Megatron's TE extension imported it (a bare meta package is not)."""
    if not have_module("transformer_engine"):
        return False
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE)


def have_mamba_kernels(variant: str = "mamba2") -> bool:
    """mamba-ssm's kernels for the M variant (Mamba-3's SISO scan ships from mamba-ssm 2.3)."""
    if variant == "mamba3":
        return have_module("mamba_ssm") and have_module("mamba_ssm.ops.triton.mamba3")
    return have_module("mamba_ssm") and have_module("causal_conv1d")


@dataclass(frozen=True)
class FamilyBuild:
    """What the dispatcher decided for one block family."""

    letter: str
    family: str
    requested: str
    built: str  # "te" or "local": which linears/norms/attention core
    path: str | None  # M, R: "fused" or "reference" scan; E: the token dispatcher; else None
    reason: str


@dataclass(frozen=True)
class BackendPlan:
    """The dispatcher's decisions for every family a layout uses."""

    requested: str
    built: str
    cuda: bool
    families: dict[str, FamilyBuild]
    #: whether DSA's indexer really rotates (False where fast_hadamard_transform is missing)
    dsa_rotate: bool = True

    def path(self, letter: str) -> str:
        return self.families[letter].path or ""

    def paths(self) -> dict[str, str | None]:
        """Each family's path (``{letter: path}``), for the per-layer plan."""
        return {letter: build.path for letter, build in self.families.items()}

    def with_path(self, letter: str, path: str, reason: str) -> BackendPlan:
        """The same plan with one family's path forced (parity tests, benchmarks); the
        reason is recorded like any other decision."""
        families = dict(self.families)
        families[letter] = replace(families[letter], path=path, reason=reason)
        return replace(self, families=families)

    def record(self) -> dict:
        """JSON-ready record for receipts: per family, requested vs built."""
        return {
            "requested": self.requested,
            "built": self.built,
            "cuda": self.cuda,
            "dsa_rotate": self.dsa_rotate,
            "families": {letter: asdict(build) for letter, build in self.families.items()},
        }


#: what each expert kernel is, for the record
EXPERT_KERNELS = {
    "te": "Transformer Engine GroupedLinear (one cuBLAS GEMM per expert)",
    "torch": "torch grouped GEMM (one kernel per projection, device group offsets)",
    "sequential": "SequentialMLP (one GEMM pair per expert)",
}


def experts_kernel(built: str, grouped_gemm: bool, expert_gemm: str) -> str:
    """The E experts' kernel for a backend: ``te``, ``torch`` or ``sequential`` (the local
    backend, or grouped_gemm off). ``expert_gemm`` picks between the two grouped kernels."""
    if built != "te" or not grouped_gemm:
        return "sequential"
    return "torch" if expert_gemm == "torch" else "te"


def dsa_rotation(asked: bool) -> tuple[bool, str]:
    """Whether DSA's indexer can rotate (Hadamard) here, and what to record.

    Megatron's indexer needs ``fast_hadamard_transform`` for the rotation; where it is
    missing the plugin builds DSA without it (different indexer maths) and says so.
    """
    if not asked:
        return False, "DSA indexer rotation off (recipe)"
    if have_module("fast_hadamard_transform"):
        return True, "DSA indexer Hadamard rotation on (fast_hadamard_transform)"
    return False, ("DEVIATION: DSA indexer rotation OFF although the recipe asks for it: "
                   "fast_hadamard_transform is not installed (Megatron's indexer cannot "
                   "rotate without it); the indexer scores unrotated q/k")


def resolve_backend(
    requested: str,
    layout: Layout,
    cuda: bool | None = None,
    moe_dispatcher: str = "alltoall",
    r_head_dims: tuple[int, int] | None = None,
    mamba_variant: str = "mamba2",
    attention_variants: frozenset[str] | set[str] = frozenset(),
    dsa_rotate: bool = True,
    r_form: str | None = None,
    expert_gemm: str = "te",
    grouped_gemm: bool = True,
) -> BackendPlan:
    """Decide, once, how every family of ``layout`` is built on this machine.

    ``moe_dispatcher`` is the token dispatcher the settings ask for; without CUDA Megatron's
    alltoall dispatcher cannot be built (it allocates CUDA streams), so E layers then use
    allgather, which routes identically at expert-parallel size 1, and the record says so.
    ``r_head_dims`` (k_head_dim, v_head_dim) of R layers: sizes the fused scan is not built
    for run the reference scan, and the record says why.
    ``attention_variants`` (gqa, mla, dsa) are recorded as A's path; ``dsa_rotate`` is what
    the settings ask of the DSA indexer (see :func:`dsa_rotation`); ``r_form`` describes the
    R layer's form for the record; ``expert_gemm`` and ``grouped_gemm`` (model.moe) say which
    expert kernel E asks for (see :func:`experts_kernel`).
    """
    if requested not in BACKENDS:
        raise SpecError(f"backend {requested!r} is not known; accepted: {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te_ok = cuda and have_transformer_engine()
    if requested == "te" and not te_ok:
        missing = "a CUDA GPU" if not cuda else "Transformer Engine (pip install -e '.[te]')"
        raise SpecError(f"backend te needs Transformer Engine and a CUDA GPU; missing: {missing}."
                        " Use backend local (or auto) on this machine.")
    built = "te" if (requested == "te" or (requested == "auto" and te_ok)) else "local"
    why = {
        "te": "Transformer Engine modules",
        "local": "Megatron local linears, torch norms, SDPA attention"
        + ("" if requested == "local" else " (auto: Transformer Engine or CUDA not available)"),
    }[built]

    if layout.mtp and not cuda:
        raise SpecError(
            f"multi-token prediction ({layout.mtp_depth} MTP depth(s) of {layout.mtp[0]!r}) "
            f"needs CUDA: Megatron-Core {MEGATRON_CORE}'s MTP loss tracking allocates its "
            "buffers on "
            "the GPU. Drop the '/' parts of the pattern to build on this machine.")
    letters = [letter for letter in FAMILIES if layout.has(letter)]
    families: dict[str, FamilyBuild] = {}
    rotate = dsa_rotate
    for letter in letters:
        path, reason = None, why
        if letter == "A" and attention_variants:
            latent = sorted(set(attention_variants) & {"mla", "dsa"})
            if latent and not cuda:
                raise SpecError(
                    f"A layers with {' and '.join(latent)} attention need CUDA: Megatron-Core "
                    f"{MEGATRON_CORE}'s MLASelfAttention builds its rotary embedding on "
                    "torch.cuda.current_device() (RotaryEmbedding / YarnRotaryEmbedding), "
                    "and DSA's indexer is a GPU kernel path. Build them on a GPU machine, or "
                    "use model.attention.variant gqa here")
            path = "+".join(v for v in ("gqa", "mla", "dsa") if v in attention_variants)
            reason = f"{why}; attention {path}"
            if "dsa" in attention_variants:
                rotate, note = dsa_rotation(dsa_rotate)
                reason += f"; {note}"
        if letter == "M":
            if cuda and have_mamba_kernels(mamba_variant):
                path = "fused"
                reason = f"{why}; " + ("mamba-ssm's Mamba-3 SISO Triton scan"
                                       if mamba_variant == "mamba3" else
                                       "Megatron's MambaMixer (mamba-ssm fused SSD scan)")
            elif built == "te":
                raise SpecError(
                    f"M layers {_numbers(layout, 'M')}: backend te runs Mamba-2 with mamba-ssm's "
                    "fused kernels, and mamba-ssm/causal-conv1d are not installed "
                    "(pip install -e '.[gpu]'); or use backend local for the PyTorch reference")
            else:
                path = "reference"
                reason = f"{why}; PyTorch reference of " + (
                    "mamba-ssm's Mamba-3 SISO scan" if mamba_variant == "mamba3"
                    else "MambaMixer") + " (" + (
                    "no CUDA)" if not cuda else "mamba-ssm kernels for it not installed)")
        elif letter == "R":
            unsupported = r_head_dims and fused_head_dims_problem(*r_head_dims)
            if cuda and unsupported:
                path, reason = "reference", f"{why}; PyTorch reference M2RNN scan ({unsupported})"
            elif cuda:
                path, reason = "fused", f"{why}; Triton M2RNN scan"
            else:
                path, reason = "reference", f"{why}; PyTorch reference M2RNN scan (no CUDA)"
            if r_form:
                reason += f"; R form: {r_form}"
        elif letter == "E":
            path = moe_dispatcher
            if moe_dispatcher == "flex" and not (cuda and have_module("deep_ep")):
                missing = "a CUDA GPU" if not cuda else "the deep_ep package (DeepEP)"
                raise SpecError(
                    f"E layers {_numbers(layout, 'E')}: token dispatcher flex runs DeepEP's "
                    f"fused dispatch, which needs {missing}; set model.moe.token_dispatcher "
                    "alltoall (or allgather) on this machine")
            if not cuda and moe_dispatcher == "alltoall":
                path = "allgather"
                reason = f"{why}; allgather token dispatcher (alltoall needs CUDA streams)"
            else:
                reason = f"{why}; {moe_dispatcher} token dispatcher"
            kernel = experts_kernel(built, grouped_gemm, expert_gemm)
            reason += "; experts: " + EXPERT_KERNELS[kernel]
            if expert_gemm == "torch" and kernel != "torch":
                reason += " (expert_gemm torch applies to backend te with grouped_gemm)"
        elif letter == "G" and not (cuda and have_module("fla")):
            missing = "a CUDA GPU" if not cuda else "flash-linear-attention"
            raise SpecError(
                f"G layers {_numbers(layout, 'G')} cannot be built here: Megatron's Gated "
                f"DeltaNet runs flash-linear-attention's Triton kernels, which need {missing}. "
                "Install it on a GPU machine (pip install flash-linear-attention) or remove G "
                "from the pattern.")
        families[letter] = FamilyBuild(letter, FAMILIES[letter], requested, built, path, reason)
    return BackendPlan(requested=requested, built=built, cuda=cuda, families=families,
                       dsa_rotate=rotate)


def _numbers(layout: Layout, letter: str) -> str:
    main = list(layout.positions(letter))
    mtp = [f"mtp{layer.mtp_part}:{layer.number}" for layer in layout.mtp_layers
           if layer.letter == letter]
    return ", ".join([*map(str, main), *mtp])


def receipt_backends(record: dict) -> dict[str, dict]:
    """A plan's record (``BackendPlan.record()``) as a receipt's ``backends`` section:
    per family, what was requested and everything about what was built."""
    return {letter: {"requested": build["requested"], "observed": build}
            for letter, build in record.get("families", {}).items()}

"""The layout contract: parse, validate and tile a hybrid layer pattern.

A pattern is a string of block letters, one letter per residual layer::

    A attention   E MoE feed-forward   M Mamba-2   F dense MLP
    R recurrent (M2RNN, plugin-only)   G Gated DeltaNet

``|`` marks pipeline stage boundaries and ``/`` starts multi-token-prediction (MTP) parts
after the main pattern (``MAIN/MTP/MTP``; every MTP part identical, as Megatron requires).

A main pattern without ``|`` tiles to the declared depth (``AEMEAEMEAEMR`` at depth 52 is
four full tiles plus ``AEME``); with ``|`` the stages must add up to the depth exactly.
Anything else fails closed with a :class:`PatternError` that shows the pattern with a caret
under the offending character. This module is pure Python: nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from megacpp_mcore.errors import PatternError
from megacpp_mcore.paths import PATTERNS_DIR

#: letter -> family name, in the order used for counts and tables.
FAMILIES: dict[str, str] = {
    "A": "attention",
    "E": "moe",
    "M": "mamba",
    "F": "mlp",
    "R": "recurrent",
    "G": "gated_deltanet",
}
STAGE_SEPARATOR = "|"
MTP_SEPARATOR = "/"
#: most layers a layout may hold (main decoder plus MTP layers). The deepest published
#: hybrids and transformers have 52-126 layers (NAM56R 52, Nemotron-H 56B 118, Llama 3.1 405B
#: 126); 4096 leaves more than 30x room while keeping a layout (one small object per layer)
#: and every per-layer table built from it to a few megabytes, so a mistyped depth (10**9)
#: fails at once instead of exhausting memory.
MAX_LAYERS = 4096
#: longest pattern string accepted: every layer a letter plus a separator, with room to spare.
MAX_PATTERN_CHARS = 4 * MAX_LAYERS

ACCEPTED = (
    "accepted: "
    + ", ".join(f"{letter} ({family})" for letter, family in FAMILIES.items())
    + f"; separators '{STAGE_SEPARATOR}' (pipeline stage boundary) and "
    f"'{MTP_SEPARATOR}' (multi-token-prediction parts after the main pattern)"
)


def _fail(problem: str, pattern: str, column: int | None) -> PatternError:
    """Build a PatternError that points at ``pattern[column]`` with a caret."""
    lines = [problem, f"  {pattern}"]
    if column is not None:
        lines.append("  " + " " * column + "^")
    lines.append(ACCEPTED)
    return PatternError("\n".join(lines))


@dataclass(frozen=True)
class Layer:
    """One residual layer of a layout.

    ``index`` is 0-based within its part (the main decoder, or one MTP part); ``number`` is
    the 1-based form Megatron uses for ``layer_number``. ``stage`` is the pipeline stage
    (MTP layers live on the last stage); ``mtp_part`` is 0 for the main decoder and k >= 1
    for the k-th MTP depth.
    """

    index: int
    letter: str
    stage: int
    mtp_part: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.letter, str) or self.letter not in FAMILIES:
            raise PatternError(f"layer {self.index!r}: unknown letter {self.letter!r}\n{ACCEPTED}")
        for name in ("index", "stage", "mtp_part"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PatternError(f"layer {self.index!r} ({self.letter}): {name} must be an "
                                   f"integer >= 0, got {value!r}")

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def family(self) -> str:
        return FAMILIES[self.letter]


@dataclass(frozen=True)
class Layout:
    """An immutable, validated layer layout (build it with :func:`parse_pattern`)."""

    layers: tuple[Layer, ...]
    mtp_layers: tuple[Layer, ...] = ()

    def __post_init__(self) -> None:
        """A Layout built directly (not by :func:`parse_pattern`) obeys the same contract."""
        for name in ("layers", "mtp_layers"):
            value = getattr(self, name)
            if not isinstance(value, tuple | list) or not all(
                    isinstance(x, Layer) for x in value):
                raise PatternError(f"Layout.{name} must be a tuple of Layer, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.layers:
            raise PatternError(f"a layout needs at least one layer\n{ACCEPTED}")
        previous = 0
        for i, layer in enumerate(self.layers):
            if layer.index != i or layer.mtp_part != 0:
                raise PatternError(f"main-decoder layer {i + 1}: expected index {i} and "
                                   f"mtp_part 0, got index {layer.index}, mtp_part "
                                   f"{layer.mtp_part}")
            if layer.stage not in (previous, previous + 1) or (i == 0 and layer.stage != 0):
                raise PatternError(f"main-decoder layer {i + 1}: pipeline stages start at 0 "
                                   f"and grow by one, got stage {layer.stage} after {previous}")
            previous = layer.stage
        parts: dict[int, list[Layer]] = {}
        for layer in self.mtp_layers:
            parts.setdefault(layer.mtp_part, []).append(layer)
        if sorted(parts) != list(range(1, len(parts) + 1)):
            raise PatternError(f"MTP parts must be numbered 1..{len(parts)}, got {sorted(parts)}")
        first = [x.letter for x in parts.get(1, [])]
        for k, part in parts.items():
            if [x.index for x in part] != list(range(len(part))) or [
                    x.letter for x in part] != first or any(x.stage != previous for x in part):
                raise PatternError(f"MTP part {k}: layers must be indexed 0.. on the last stage "
                                   f"({previous}) and identical to MTP part 1 {''.join(first)!r}")

    @property
    def depth(self) -> int:
        """Number of main-decoder layers."""
        return len(self.layers)

    @cached_property
    def letters(self) -> str:
        """The main decoder as one letter per layer (no separators)."""
        return "".join(layer.letter for layer in self.layers)

    @cached_property
    def stages(self) -> tuple[str, ...]:
        """The main decoder split into pipeline stages, one string of letters each."""
        n_stages = self.layers[-1].stage + 1
        return tuple(
            "".join(layer.letter for layer in self.layers if layer.stage == s)
            for s in range(n_stages)
        )

    @cached_property
    def mtp(self) -> tuple[str, ...]:
        """The MTP parts, one string of letters per depth (all identical)."""
        depth = max((layer.mtp_part for layer in self.mtp_layers), default=0)
        return tuple(
            "".join(layer.letter for layer in self.mtp_layers if layer.mtp_part == k)
            for k in range(1, depth + 1)
        )

    @property
    def mtp_depth(self) -> int:
        return len(self.mtp)

    @cached_property
    def counts(self) -> dict[str, int]:
        """Main-decoder layers per letter, every letter present (zeros included)."""
        return {letter: self.letters.count(letter) for letter in FAMILIES}

    @cached_property
    def canonical(self) -> str:
        """The fully expanded pattern; ``parse_pattern(layout.canonical) == layout``."""
        return MTP_SEPARATOR.join((STAGE_SEPARATOR.join(self.stages), *self.mtp))

    def positions(self, letter: str) -> tuple[int, ...]:
        """1-based layer numbers of the main decoder that carry ``letter``."""
        return tuple(layer.number for layer in self.layers if layer.letter == letter)

    def has(self, letter: str) -> bool:
        return letter in self.letters or any(letter in part for part in self.mtp)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (the schema of ``megacpp pattern --json``)."""
        return {
            "pattern": self.canonical,
            "depth": self.depth,
            "layers": list(self.letters),
            "families": [layer.family for layer in self.layers],
            "counts": self.counts,
            "stages": list(self.stages),
            "mtp": list(self.mtp),
        }

    def __str__(self) -> str:
        return self.canonical


def _check_characters(pattern: str) -> None:
    allowed = set(FAMILIES) | {STAGE_SEPARATOR, MTP_SEPARATOR}
    for column, char in enumerate(pattern):
        if char in allowed:
            continue
        if char.isspace():
            problem = f"whitespace {char!r} at column {column + 1}: patterns contain no spaces"
        elif char.upper() in FAMILIES:
            problem = (
                f"lowercase letter {char!r} at column {column + 1}: letters are upper-case "
                f"(did you mean {char.upper()!r}?)"
            )
        else:
            problem = f"unknown letter {char!r} at column {column + 1}"
        raise _fail(problem, pattern, column)


def _check_depth(depth: Any) -> None:
    if depth is None:
        return
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise PatternError(f"depth must be a positive integer, got {depth!r}")
    if depth <= 0:
        raise PatternError(f"depth must be a positive integer, got {depth}")
    if depth > MAX_LAYERS:
        raise PatternError(
            f"depth {depth} exceeds the maximum of {MAX_LAYERS} layers (megacpp_mcore.layout."
            "MAX_LAYERS; the deepest published models have about 130)"
        )


def parse_pattern(pattern: str, depth: int | None = None) -> Layout:
    """Parse ``pattern`` into a :class:`Layout` of ``depth`` main-decoder layers.

    ``depth`` may be omitted when the pattern is already full length. Raises
    :class:`PatternError` (a ``ValueError``) for anything it cannot build faithfully.
    """
    if not isinstance(pattern, str):
        raise PatternError(f"a pattern is a string of block letters, got {pattern!r}\n{ACCEPTED}")
    if not pattern:
        raise _fail("empty pattern: at least one layer letter is needed", pattern, None)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"pattern of {len(pattern)} characters exceeds the maximum of {MAX_PATTERN_CHARS} "
            f"(layouts hold at most {MAX_LAYERS} layers: megacpp_mcore.layout.MAX_LAYERS)"
        )
    _check_characters(pattern)
    _check_depth(depth)

    main, *mtp_parts = pattern.split(MTP_SEPARATOR)
    if not main:
        raise _fail(
            "MTP parts without a main pattern: the pattern must start with the main decoder",
            pattern,
            0,
        )
    mtp_start = len(main) + 1
    offset = mtp_start
    for k, part in enumerate(mtp_parts, start=1):
        if not part:
            raise _fail(f"MTP part {k} is empty", pattern, offset - 1)
        if STAGE_SEPARATOR in part:
            raise _fail(
                f"MTP part {k} contains '{STAGE_SEPARATOR}': MTP layers are not split into "
                "pipeline stages",
                pattern,
                offset + part.index(STAGE_SEPARATOR),
            )
        if part != mtp_parts[0]:
            raise _fail(
                f"MTP part {k} ({part!r}) differs from MTP part 1 ({mtp_parts[0]!r}): "
                "every MTP part must be identical",
                pattern,
                offset,
            )
        offset += len(part) + 1

    stages = main.split(STAGE_SEPARATOR)
    column = 0
    for s, stage in enumerate(stages):
        if not stage:
            where = "first" if s == 0 else "last" if s == len(stages) - 1 else f"number {s + 1}"
            raise _fail(
                f"empty pipeline stage ({where}): every stage between '{STAGE_SEPARATOR}' "
                "needs at least one layer",
                pattern,
                min(column, len(pattern) - 1),
            )
        column += len(stage) + 1

    if len(stages) > 1:
        total = sum(len(stage) for stage in stages)
        if depth is not None and total != depth:
            raise _fail(
                f"the {len(stages)} pipeline stages hold {total} layers but depth is {depth}: "
                f"with '{STAGE_SEPARATOR}' the stages must add up to the depth exactly "
                "(no tiling)",
                pattern,
                None,
            )
        letters_per_stage = stages
    else:
        target = len(main) if depth is None else depth
        if target < len(main):
            raise _fail(
                f"depth {target} is shorter than the pattern ({len(main)} layers): a pattern "
                "tiles up to its depth and is never cut short of one full copy",
                pattern,
                target,
            )
        repeats = -(-target // len(main))
        letters_per_stage = [(main * repeats)[:target]]

    total = sum(map(len, letters_per_stage)) + sum(map(len, mtp_parts))
    if total > MAX_LAYERS:
        raise _fail(
            f"the layout would hold {total} layers (main decoder plus MTP), more than the "
            f"maximum of {MAX_LAYERS} (megacpp_mcore.layout.MAX_LAYERS)",
            pattern if len(pattern) <= 200 else pattern[:200] + "...",
            None,
        )
    layers: list[Layer] = []
    for stage_index, letters in enumerate(letters_per_stage):
        for letter in letters:
            layers.append(Layer(index=len(layers), letter=letter, stage=stage_index))
    last_stage = len(letters_per_stage) - 1
    mtp_layers = tuple(
        Layer(index=i, letter=letter, stage=last_stage, mtp_part=k)
        for k, part in enumerate(mtp_parts, start=1)
        for i, letter in enumerate(part)
    )
    return Layout(layers=tuple(layers), mtp_layers=mtp_layers)


# --------------------------------------------------------------------------- named families


def _family_files() -> dict[str, Path]:
    return {path.stem: path for path in PATTERNS_DIR.glob("*.yaml")}


def known_families() -> list[str]:
    """Names of the pattern families shipped in ``patterns/``."""
    return sorted(_family_files())


@dataclass(frozen=True)
class PatternFamily:
    """A named pattern from ``patterns/<name>.yaml``: the pattern, its depth and provenance."""

    name: str
    pattern: str
    depth: int | None
    description: str
    source: str

    def layout(self, depth: int | None = None) -> Layout:
        return parse_pattern(self.pattern, self.depth if depth is None else depth)


def load_family(name: str) -> PatternFamily:
    """Load a named family; an unknown name is a PatternError that lists the known ones."""
    files = _family_files()
    if name not in files:
        raise PatternError(
            f"unknown pattern family {name!r}; known families: {', '.join(sorted(files))}"
        )
    data = yaml.safe_load(files[name].read_text())
    expected = {"pattern", "depth", "description", "source"}
    if not isinstance(data, dict) or not {"pattern", "description"} <= set(data):
        raise PatternError(
            f"patterns/{name}.yaml must be a mapping with 'pattern' and 'description'"
        )
    unknown = set(data) - expected
    if unknown:
        raise PatternError(
            f"patterns/{name}.yaml: unknown keys {sorted(unknown)}; accepted: {sorted(expected)}"
        )
    family = PatternFamily(
        name=name,
        pattern=str(data["pattern"]),
        depth=data.get("depth"),
        description=str(data["description"]).strip(),
        source=str(data.get("source", "")).strip(),
    )
    family.layout()  # a shipped family must itself be valid
    return family


def resolve(pattern_or_family: str, depth: int | None = None) -> Layout:
    """A family name (lower-case, as in ``patterns/``) or a literal pattern, to a Layout."""
    if pattern_or_family in _family_files():
        return load_family(pattern_or_family).layout(depth)
    if pattern_or_family and pattern_or_family.islower() and pattern_or_family.isidentifier():
        raise PatternError(
            f"{pattern_or_family!r} is neither a known pattern family nor a pattern; "
            f"known families: {', '.join(known_families())}\n{ACCEPTED}"
        )
    return parse_pattern(pattern_or_family, depth)

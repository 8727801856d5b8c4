"""Recipes: typed, validated training settings, loaded from ``recipes/*.yaml``.

A recipe is one YAML mapping whose keys are the fields of :class:`Recipe`: the layer
``pattern`` (a literal or a family from ``patterns/``), its ``depth``, ``mtp_depths``,
``backend``, ``r_lowering``, and one section per settings dataclass of
:mod:`megacpp_mcore.settings.config` (``model``, ``precision``, ``parallel``, ``training``,
``data``, ``logging``, ``stp``, ``plasticity``). Loading is strict, and every rejection is a
:class:`RecipeError` that names the file, the key path (``model.moe.top_k``), what was wrong
and what is accepted:

* unknown sections and keys are errors (never silently ignored), and so are duplicate keys;
* types are exact: ``true`` is not an integer, ``1`` is not a boolean, an integer is accepted
  where a number (float) is expected; literals accept only their listed values. Numbers in
  exponent form without a dot (``3e-4``) are read as numbers (YAML 1.2), not as strings;
* impossible values (non-positive sizes, dropouts outside [0, 1), ...) are refused;
* cross-field rules (sizes vs the layout and the parallel split, pipeline stages, precision,
  batch sizes, data) are checked after the whole recipe is resolved, only for the block
  families the layout uses (:func:`megacpp_mcore.settings.rules.recipe_problems`).

``base: other.yaml`` (relative to the recipe's folder) deep-merges the recipe over another
one (chains are allowed, cycles are errors); command-line overrides (``--set
model.hidden_size=2048``, values read as YAML scalars) are applied last, with the same checks.

The package by concern: ``schema.py`` (the one type engine: checks, docs, type names),
``config.py`` (the sections), ``yaml_text.py`` (the strict YAML and the ``base:`` chain),
``origins.py`` (which file or ``--set`` gave each key), ``overrides.py`` (``--set``),
``rules.py`` (cross-field rules), ``sizes.py`` (size rules shared with the model builder),
``describe.py`` (``megacpp recipe describe``) and ``table.py`` (how settings reach Megatron).
This module keeps :class:`Recipe` and :func:`load_recipe`. Pure Python: nothing here imports
torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.jsonio import content_hash
from megacpp_mcore.layout import Layout, known_families, parse_pattern, resolve
from megacpp_mcore.settings.config import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PlasticityConfig,
    PrecisionConfig,
    StpConfig,
    TrainingConfig,
)
from megacpp_mcore.settings.origins import Origins, fail, located, merge
from megacpp_mcore.settings.overrides import apply_override, check_override_key, parse_override
from megacpp_mcore.settings.rules import recipe_problems
from megacpp_mcore.settings.schema import (
    FieldError,
    NonNegativeInt,
    Section,
    coerce,
    describe_type,
    hints,
    key_fields,
    plain,
    show,
)
from megacpp_mcore.settings.yaml_text import (
    BASE_KEY,
    display,
    known_recipes,
    read_chain,
    recipe_path,
)

BACKENDS = ("auto", "te", "local")
#: letters an R layer may be lowered to for the native target (every stock Megatron family).
R_LOWERINGS = ("M", "A", "F", "E", "G")


@dataclass(frozen=True)
class Recipe(Section):
    """A training recipe: the layout, the model, and how it is trained."""

    name: str
    """the recipe's name: its file name without .yaml (not a key in the file)."""
    pattern: str
    """a pattern family from patterns/ (e.g. nam56r) or a literal pattern such as AEMEAEMEAEMR; '|'
    splits pipeline stages, '/' starts multi-token-prediction parts."""
    description: str = ""
    """free text shown by ``megacpp recipe show``."""
    depth: int | None = None
    """main-decoder layers to tile the pattern to; null means the family's depth, or the literal
    pattern's own length."""
    mtp_depths: NonNegativeInt = 0
    """number of multi-token-prediction depths. The MTP layers themselves come from the pattern's
    '/' parts (PATTERN/MTP/MTP: one identical part per depth), so mtp_depths must equal the
    number of '/' parts: 0 for a pattern without '/'. It is a declared count that the pattern is
    checked against, never a way to add MTP layers the pattern does not spell out."""
    backend: Literal["auto", "te", "local"] = "auto"
    """auto (Transformer Engine where it is usable, else local), te (Transformer Engine, refused
    where unavailable) or local (Megatron's local modules and torch)."""
    r_lowering: Literal["M", "A", "F", "E", "G"] | None = None
    """null, or the letter (M, A, F, E or G) that every R layer is lowered to for the native
    Megatron target, which has no recurrent layer. Never implicit: without it a native
    translation of a layout with R is refused. The plugin target ignores it (the plugin builds
    R)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the model section (shape and one sub-section per block family)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """the precision section."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """the parallel section."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """the training schedule and optimizer section."""
    data: DataConfig = field(default_factory=DataConfig)
    """the data section."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """the logging and receipts section."""
    stp: StpConfig = field(default_factory=StpConfig)
    """the STP auxiliary-loss section (trajectory straightening; off by default)."""
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)
    """the plasticity section (FIRE, DASH, ReDo; plugin only)."""
    source: str = field(default="", compare=False, metadata={"key": False})
    """where the recipe was loaded from (set by the loader; not a key)."""
    overrides: tuple[str, ...] = field(default=(), compare=False, metadata={"key": False})
    """the --set overrides applied on top of the file (set by the loader; not a key)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = recipe_problems(self)
        if problems:
            raise RecipeError(
                f"{self.where}: the recipe is inconsistent:\n  - " + "\n  - ".join(problems)
            )

    @property
    def where(self) -> str:
        """The recipe's origin for messages: its file (and the --set overrides, if any)."""
        where = self.source or f"recipe {self.name!r}"
        if self.overrides:
            where += " with " + " ".join(f"--set {o}" for o in self.overrides)
        return where

    @cached_property
    def layout(self) -> Layout:
        """The validated layer layout (pattern tiled to depth, stages, MTP parts)."""
        return resolve(self.pattern, self.depth)

    @cached_property
    def lowered_layout(self) -> Layout:
        """The layout with every R replaced by ``r_lowering`` (the layout itself if unset)."""
        if self.r_lowering is None:
            return self.layout
        return parse_pattern(self.layout.canonical.replace("R", self.r_lowering))

    def to_dict(self) -> dict[str, Any]:
        """Every recipe key with its resolved value (JSON/YAML-ready; no source/overrides)."""
        return plain({f.name: getattr(self, f.name) for f in key_fields(Recipe)})

    @cached_property
    def recipe_hash(self) -> str:
        """sha256 of the fully resolved recipe (see :func:`resolved_for_hash`)."""
        return content_hash(resolved_for_hash(self))


def resolved_for_hash(recipe: Recipe) -> dict[str, Any]:
    """What the recipe hash covers: every setting, with the pattern fully expanded.

    The name, description, source file and overrides are left out (the same settings under
    another file name hash the same), and ``pattern``/``depth`` are replaced by the expanded
    canonical layout, so a family name and its literal spelling hash the same. Hashed as
    sorted, compact JSON (``receipt.content_hash``).
    """
    data = recipe.to_dict()
    for key in ("name", "description"):
        data.pop(key)
    data["pattern"] = recipe.layout.canonical
    data["depth"] = recipe.layout.depth
    return data


# --------------------------------------------------------------------------- loading


def file_keys(cls: type) -> list[str]:
    """The keys a recipe file may hold at the level of ``cls``."""
    names = [f.name for f in key_fields(cls)]
    if cls is Recipe:
        names.remove("name")  # from the file name
        names.insert(0, BASE_KEY)
    return names


def _value(value: Any, tp: Any, path: str, origins: Origins) -> Any:
    """A leaf value checked by the type engine, or a section built from its mapping."""
    inner = _section_type(tp)
    if inner is None:
        try:
            return coerce(value, tp, path)
        except FieldError as err:
            raise located(origins, err) from None
    if value is None and inner is not tp:
        return None
    if not isinstance(value, dict):
        raise fail(origins, path, f"expected a section, got {show(value)}", describe_type(tp))
    return _build(inner, value, path, origins)


def _section_type(tp: Any) -> type | None:
    """The section class of a field (``Section`` or ``Section | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build(cls: type, data: dict, prefix: str, origins: Origins, **extra: Any) -> Any:
    """The section ``cls`` from its merged mapping ``data``: unknown and missing keys
    refused, every value checked in field order, then the section constructed (its own
    rules run there; a refusal names the value's origin)."""
    accepted = file_keys(cls)
    if cls is not Recipe:
        accepted = [k for k in accepted if k != BASE_KEY]
    for key in data:
        if key not in accepted:
            path = f"{prefix}.{key}" if prefix else str(key)
            where = f"section {prefix}" if prefix else "a recipe"
            raise fail(origins, path, "unknown key", f"the keys of {where}: {', '.join(accepted)}")
    tps = hints(cls)
    kwargs: dict[str, Any] = dict(extra)
    for f in key_fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _value(data[f.name], tps[f.name], path, origins)
        elif (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in kwargs
        ):
            raise fail(origins, path, "required key is missing", describe_type(tps[f.name]))
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise located(origins, err) from None


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge (``base:``), override (``--set``) and validate a recipe.

    ``name_or_path`` is a YAML file or the name of a recipe in ``recipes/``; ``overrides``
    are ``KEY=VALUE`` strings. Raises :class:`RecipeError` for anything wrong.
    """
    path = recipe_path(name_or_path)
    shown = display(path)
    origins = Origins(shown)
    merged: dict[str, Any] = {}
    for origin, data in read_chain(path, file_keys(Recipe)):
        merge(merged, data, origin, origins)
    for text in overrides:
        key, value = parse_override(text)
        check_override_key(Recipe, key, text, file_keys)
        apply_override(merged, key, value, f"--set {text}", origins)
    name = path.stem
    if isinstance(merged.get("description"), str):
        merged["description"] = merged["description"].strip()  # YAML '>' adds a newline
    if "pattern" not in merged:
        raise fail(origins, "pattern", "required key is missing",
                   f"a pattern family ({', '.join(known_families())}) or a literal pattern")
    return _build(Recipe, merged, "", origins, name=name, source=shown,
                  overrides=tuple(overrides))


__all__ = [
    "BACKENDS",
    "R_LOWERINGS",
    "Recipe",
    "file_keys",
    "known_recipes",
    "load_recipe",
    "resolved_for_hash",
]

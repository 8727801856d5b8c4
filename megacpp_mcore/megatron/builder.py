"""Megatron's HybridModel builder, plus the plugin's embedding extension.

Megatron's ``pretrain`` builds the model with the builder class its model config names
(``HybridModelConfig.builder``, imported by ``get_builder_cls``). Where a recipe enables the
n-gram hash features (``model.ngram_hash``), the launcher hands ``pretrain`` this config
subclass, whose builder builds exactly as Megatron's and then attaches the features to the
embedding: before Megatron wraps the model for data parallelism and builds the optimizer, so
their parameters train, reduce and checkpoint like any other. Nothing of Megatron is patched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from megatron.training.models.hybrid import HybridModelBuilder, HybridModelConfig

from megacpp_mcore.layers.ngram_hash import attach_ngram_hash
from megacpp_mcore.megatron.spec_seam import BUILDER_MARK
from megacpp_mcore.settings.config import NgramHashConfig


@dataclass
class MegacppHybridModelConfig(HybridModelConfig):
    """Megatron's hybrid model config naming the plugin's builder."""

    builder: ClassVar[str] = "megacpp_mcore.megatron.builder.MegacppHybridModelBuilder"
    ngram_hash: NgramHashConfig = field(default_factory=NgramHashConfig)


class MegacppHybridModelBuilder(HybridModelBuilder):
    """Megatron's builder; each built stage then gets the recipe's embedding extension."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        model = super().build_model(pg_collection, pre_process, post_process, vp_stage)
        attach_ngram_hash(model, self._model_config.ngram_hash)
        return model


def with_plugin_builder(config: HybridModelConfig, ngram_hash: NgramHashConfig,
                        args) -> HybridModelConfig:
    """``config`` unchanged where nothing needs the plugin's builder, else the same values
    in :class:`MegacppHybridModelConfig`, and Megatron's ``args`` marked so the --spec seam
    (run when the model is built) knows this builder attaches the embedding extension."""
    if not ngram_hash.enabled:
        return config
    setattr(args, BUILDER_MARK, True)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return MegacppHybridModelConfig(**values, ngram_hash=ngram_hash)

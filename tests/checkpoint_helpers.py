"""Megatron ``torch_dist`` checkpoints on a CPU machine (tests only).

Megatron-Core 0.19.2 saves ``torch_dist`` checkpoints through its asynchronous writer, which
calls ``torch.cuda.synchronize()`` after copying tensors to host memory and all-reduces its
failure flag on ``torch.cuda.current_device()``: the save cannot run without a CUDA driver.
``save_sync`` (CPU or GPU) keeps everything else Megatron's own: ``dist_checkpointing.save``
(validation, sharded-tensor factories, ``metadata.json``) with a save strategy that
translates the sharded state dict exactly as ``TorchDistSaveShardedStrategy`` does (Megatron's
key mapping, ``mcore_to_pyt_state_dict``, ``MCoreSavePlanner``) and writes it with torch's
synchronous ``FileSystemWriter``, so the files are a ``torch_dist`` checkpoint. Loading is
Megatron's unchanged ``dist_checkpointing.load``.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling


class SyncTorchDistSave(TorchDistSaveShardedStrategy):
    """Megatron's torch_dist save, written synchronously (no CUDA calls)."""

    def save(self, sharded_state_dict, checkpoint_dir: Path):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        dcp.save(
            mcore_to_pyt_state_dict(sharded_state_dict, False),
            storage_writer=dcp.FileSystemWriter(checkpoint_dir, thread_count=1),
            planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                     flatten_state_dict=False, flatten_sharded_tensors=False),
        )


def save_sync(model, checkpoint_dir) -> None:
    """Save ``model``'s sharded state dict as a torch_dist checkpoint (all ranks call it)."""
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir),
                            sharded_strategy=SyncTorchDistSave("torch_dist", 1))


def load(model, checkpoint_dir) -> None:
    """Load a torch_dist checkpoint into ``model`` (Megatron's loader; every key must match)."""
    state = dist_checkpointing.load(model.sharded_state_dict(), str(checkpoint_dir),
                                    strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(state, strict=True)

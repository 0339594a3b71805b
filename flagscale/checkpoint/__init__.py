"""Checkpoint save, load, resolution and offline reading (megatron-core torch_dist format)."""

from flagscale.checkpoint.meta import CheckpointMeta
from flagscale.checkpoint.paths import (checkpoint_problem, complete_checkpoints, iteration_dir,
                                        latest_checkpoint, resolve_checkpoint,
                                        retire_checkpoints)
from flagscale.checkpoint.state import (AsyncSaves, load_checkpoint, read_run_state,
                                        save_checkpoint)

__all__ = ["AsyncSaves", "CheckpointMeta", "save_checkpoint", "load_checkpoint", "read_run_state",
           "resolve_checkpoint", "latest_checkpoint", "complete_checkpoints", "iteration_dir",
           "checkpoint_problem", "retire_checkpoints"]

"""Re-export: the torch_dist reader lives in :mod:`flagscale.checkpoint.reader` (it reads
checkpoints, which the conversion builds on)."""

from flagscale.checkpoint.reader import CheckpointReader

__all__ = ["CheckpointReader"]

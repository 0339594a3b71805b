"""FLOPs, throughput and MFU accounting, and the metrics loggers."""

from __future__ import annotations

from pathlib import Path

from flagscale.metrics.loggers import ConsoleLogger, JsonlLogger
from flagscale.metrics.throughput import ThroughputMeter


def build_metric_hooks(cfg, layout, run_dir: Path) -> list:
    """The hooks that turn step reports into metrics records and write them, in order."""
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    return [ThroughputMeter(tokens, layout.world_size), ConsoleLogger(),
            JsonlLogger(Path(run_dir) / "metrics.jsonl")]

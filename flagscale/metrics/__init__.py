"""FLOPs, throughput and MFU accounting, and the metrics loggers.

The training loop builds a :class:`ThroughputMeter` (:func:`build_throughput_meter`) and the
loggers of its config (:func:`build_loggers`) on the writer rank; its callbacks feed the meter step
times and hand every finished record to each logger.
"""

from __future__ import annotations

from pathlib import Path

from flagscale.config.loader import config_to_dict
from flagscale.metrics.devices import (PEAK_TFLOPS, canonical_device, mfu_precision, peak_tflops,
                                       resolve_peak)
from flagscale.metrics.flops import (CONVENTIONS, FlopsEstimate, ParamCount, count_params,
                                     flops_for_config, flops_per_token, padded_vocab, preset_model)
from flagscale.metrics.loggers import (ConsoleLogger, JsonlLogger, TensorBoardLogger, WandbLogger,
                                       run_name)
from flagscale.metrics.throughput import ThroughputMeter, memory_usage

__all__ = ["CONVENTIONS", "PEAK_TFLOPS", "ConsoleLogger", "FlopsEstimate", "JsonlLogger",
           "ParamCount", "TensorBoardLogger", "ThroughputMeter", "WandbLogger", "build_loggers",
           "build_throughput_meter", "canonical_device", "count_params", "flops_for_config",
           "flops_per_token", "memory_usage", "padded_vocab", "peak_tflops", "preset_model",
           "resolve_peak"]


def build_throughput_meter(cfg, layout) -> ThroughputMeter:
    """The meter for a run: Megatron-convention FLOPs of its config and its device's peak."""
    device, peak, why = resolve_peak(cfg.metrics.device, mfu_precision(cfg.model),
                                     cfg.metrics.peak_tflops)
    return ThroughputMeter(tokens_per_step=cfg.train.global_batch_size * cfg.train.seq_length,
                           world_size=layout.world_size, flops=flops_for_config(cfg),
                           peak_tflops=peak, device=device, peak_missing_reason=why)


def build_loggers(cfg, run_dir: Path) -> list:
    """The loggers a run's config asks for: console and ``metrics.jsonl`` always, then wandb and
    TensorBoard when enabled.

    Raises :class:`~flagscale.errors.ConfigError` up front for TensorBoard requested but not
    installed.
    """
    run_dir = Path(run_dir)
    loggers = [ConsoleLogger(cfg.train.iterations), JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.metrics.wandb:
        loggers.append(WandbLogger(cfg.metrics.wandb_project, run_name(run_dir, cfg.run.name),
                                   config_to_dict(cfg), run_dir))
    if cfg.metrics.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
    return loggers

"""FLOPs, throughput and MFU accounting, and the metrics loggers.

The training loop calls :func:`build_metric_hooks` once and runs the returned hooks in order: the
:class:`ThroughputMeter` fills each record's throughput keys, then the writers write it.
"""

from __future__ import annotations

from pathlib import Path

from flagscale.config.loader import config_to_dict
from flagscale.metrics.devices import PEAK_TFLOPS, canonical_device, peak_tflops, resolve_peak
from flagscale.metrics.flops import (CONVENTIONS, FlopsEstimate, ParamCount, count_params,
                                     flops_for_config, flops_per_token, padded_vocab, preset_model)
from flagscale.metrics.loggers import (ConsoleLogger, JsonlLogger, TensorBoardLogger, WandbLogger,
                                       run_name)
from flagscale.metrics.throughput import ThroughputMeter, memory_usage

__all__ = ["CONVENTIONS", "PEAK_TFLOPS", "ConsoleLogger", "FlopsEstimate", "JsonlLogger",
           "ParamCount", "TensorBoardLogger", "ThroughputMeter", "WandbLogger",
           "build_metric_hooks",
           "build_throughput_meter", "canonical_device", "count_params", "flops_for_config",
           "flops_per_token", "memory_usage", "padded_vocab", "peak_tflops", "preset_model",
           "resolve_peak"]


def build_throughput_meter(cfg, layout) -> ThroughputMeter:
    """The meter for a run: Megatron-convention FLOPs of its config and its device's peak."""
    device, peak, why = resolve_peak(cfg.metrics.device, cfg.model.params_dtype,
                                     cfg.metrics.peak_tflops)
    return ThroughputMeter(tokens_per_step=cfg.train.global_batch_size * cfg.train.seq_length,
                           world_size=layout.world_size, flops=flops_for_config(cfg),
                           peak_tflops=peak, device=device, peak_missing_reason=why)


def build_metric_hooks(cfg, layout, run_dir: Path) -> list:
    """The hooks that turn step reports into metrics records and write them, in order.

    Raises :class:`~flagscale.errors.ConfigError` up front for a configured device without a known
    peak or TensorBoard requested but not installed.
    """
    run_dir = Path(run_dir)
    hooks = [build_throughput_meter(cfg, layout), ConsoleLogger(),
             JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.metrics.wandb:
        hooks.append(WandbLogger(cfg.metrics.wandb_project, run_name(run_dir, cfg.run.name),
                                 config_to_dict(cfg), run_dir))
    if cfg.metrics.tensorboard:
        hooks.append(TensorBoardLogger(run_dir / "tensorboard"))
    return hooks

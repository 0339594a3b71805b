"""The training loop's callbacks: evaluation, checkpointing, throughput, loggers, spike reports.

:func:`build_callbacks` returns the ones a config asks for. Which rank writes is decided once, by
the trainer (``Trainer.is_writer``, global rank 0): the throughput and logger callbacks exist only
on that rank; the others run on every rank because they take part in collectives, and the spike
callback writes its reports only where it was given a tracer (the writer rank).
"""

from __future__ import annotations

from pathlib import Path

from flagscale.metrics import build_loggers, build_throughput_meter
from flagscale.train.callbacks.base import Callback, StepInfo
from flagscale.train.callbacks.checkpointing import CheckpointCallback
from flagscale.train.callbacks.evaluation import EvaluationCallback
from flagscale.train.callbacks.loggers import LoggerCallback
from flagscale.train.callbacks.spikes import SpikeReportCallback
from flagscale.train.callbacks.stop import StopOnSignalCallback, StopRequest
from flagscale.train.callbacks.throughput import ThroughputCallback

__all__ = ["Callback", "CheckpointCallback", "EvaluationCallback", "LoggerCallback",
           "SpikeReportCallback", "StepInfo", "StopOnSignalCallback", "StopRequest",
           "ThroughputCallback", "build_callbacks"]


def build_callbacks(cfg, layout, run_dir: Path, is_writer: bool) -> list[Callback]:
    """The callbacks of a run configured by ``cfg`` on a rank that writes (``is_writer``) or not.

    Raises :class:`~flagscale.errors.ConfigError` up front for settings a callback cannot honour
    (a device without a known peak, TensorBoard not installed).
    """
    # Built on every rank, so a config error stops every rank alike.
    meter, loggers = build_throughput_meter(cfg, layout), build_loggers(cfg, run_dir)
    callbacks: list[Callback] = []
    if cfg.trace.enabled:
        callbacks.append(SpikeReportCallback(cfg.trace))
    if cfg.train.eval_interval:
        callbacks.append(EvaluationCallback(cfg.train.eval_interval))
    if cfg.checkpoint.save_interval:
        callbacks.append(CheckpointCallback(cfg.checkpoint.save_interval,
                                            cfg.checkpoint.save_final))
    if is_writer:
        callbacks.append(ThroughputCallback(meter))
        callbacks += [LoggerCallback(logger) for logger in loggers]
    return callbacks

"""Step time, tokens/s/GPU, TFLOP/s/GPU, MFU and memory in every record."""

from __future__ import annotations

import time

from flagscale.metrics.throughput import ThroughputMeter
from flagscale.train.callbacks.base import Callback, StepInfo


class ThroughputCallback(Callback):
    """Feeds each step's wall time to a :class:`~flagscale.metrics.throughput.ThroughputMeter`
    and adds its interval metrics to each record.

    A step's wall time runs from the end of the previous step's ``post_step`` to the end of its
    own (this callback runs last there), so every second of the run belongs to exactly one step:
    besides forward, backward and the optimizer step it holds that step's spike check,
    evaluation pass and checkpoint save, and the writing of the previous record.
    """

    priority = -100

    def __init__(self, meter: ThroughputMeter):
        self.meter = meter
        self._last = 0.0

    def pre_train(self) -> None:
        self.meter.start(self.trainer.start_iteration)
        self._last = time.perf_counter()

    def post_step(self, step: StepInfo) -> None:
        now = time.perf_counter()
        self.meter.add_step(step.iteration, now - self._last,
                            step.batch_size * self.trainer.cfg.train.seq_length)
        self._last = now

    def pre_log_metrics(self, iteration: int, metrics: dict) -> None:
        metrics.update(self.meter.end_interval())

"""Throughput accounting: tokens/s/GPU over the whole world, averaged over each log interval."""

from __future__ import annotations

from flagscale.train.hooks import Hook, StepInfo


class ThroughputMeter(Hook):
    """Adds ``step_time_s`` (interval mean) and ``tokens_per_sec_per_gpu`` to each record.

    tokens/s/GPU = global_batch * seq_length / (step_time * world_size): every rank of the world
    (TP*PP*DP) counts as a GPU, so the figure is comparable across layouts.
    """

    def __init__(self, tokens_per_step: int, world_size: int):
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self._times: list[float] = []

    def on_step_end(self, state, step: StepInfo) -> None:
        self._times.append(step.step_time_s)

    def on_log(self, state, record: dict) -> None:
        times, self._times = self._times, []
        if not times:
            return
        step_time = sum(times) / len(times)
        record["step_time_s"] = step_time
        record["tokens_per_sec_per_gpu"] = self.tokens_per_step / (step_time * self.world_size)
        record.setdefault("tflops_per_gpu", None)
        record.setdefault("mfu", None)

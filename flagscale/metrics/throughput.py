"""Throughput accounting per log interval: step time, tokens/s/GPU, TFLOP/s/GPU, MFU, memory.

Definitions (REFERENCE section 3):

- ``step_time_s``: mean wall time of the steps of the interval, as measured by whoever feeds
  :meth:`ThroughputMeter.add_step` (the training loop's throughput callback says what a step's
  wall time covers). The first ``warmup_steps`` (default 1) steps after the run starts or resumes
  are left out of every average: they include allocator warm-up, kernel autotuning and first-touch
  data loading, and a single one of them can be several times a normal step. An interval holding
  only such steps reports ``null`` throughput; ``timed_steps`` says how many steps each average
  covers.
- ``tokens_per_sec_per_gpu`` = tokens of the interval's timed steps / (their total time *
  world_size), a step's tokens being its global batch * seq_length (smaller steps during a
  batch-size ramp-up): every rank of the world (TP*PP*CP*DP) is a GPU, so figures compare across
  layouts and with published numbers.
- ``tflops_per_gpu`` = model FLOPs per token (Megatron convention, no recomputation) *
  tokens/s/GPU / 1e12; ``mfu`` = that / the device's peak dense TFLOP/s (``null`` when unknown).
  ``hfu`` adds the forward work repeated by activation recomputation (equal to ``mfu`` without it).
- ``memory_gib``: peak memory allocated by tensors on this process's GPU since the start (and
  ``memory_reserved_gib``, what the caching allocator holds), or the resident set size of the
  process on CPU. Reported by the writer rank for itself.

Step times arrive as Python floats; nothing here touches device tensors, so accounting adds no host
synchronisation to the loop.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from flagscale.metrics.flops import FlopsEstimate

_GIB = float(1 << 30)


def memory_usage() -> dict[str, float]:
    """This process's memory in GiB: CUDA peak allocated/reserved on a GPU, resident set on CPU."""
    if torch.cuda.is_available():
        return {"memory_gib": torch.cuda.max_memory_allocated() / _GIB,
                "memory_reserved_gib": torch.cuda.max_memory_reserved() / _GIB}
    import psutil

    return {"memory_gib": psutil.Process().memory_info().rss / _GIB}


class ThroughputMeter:
    """Turns the step times of each log interval into step time, throughput, FLOP rates, MFU/HFU
    and memory."""

    def __init__(self, tokens_per_step: int, world_size: int, flops: FlopsEstimate,
                 peak_tflops: Optional[float], device: Optional[str] = None,
                 peak_missing_reason: str = "", warmup_steps: int = 1):
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.flops = flops
        self.peak_tflops = peak_tflops
        self.device = device
        self.peak_missing_reason = peak_missing_reason
        self.warmup_steps = warmup_steps
        self._first_timed = 1 + warmup_steps
        self._times: list[float] = []
        self._tokens: list[int] = []

    def start(self, start_iteration: int) -> None:
        """A run starts (or resumes) after ``start_iteration``: its first steps are warm-up.
        Warns once when MFU cannot be reported."""
        self._first_timed = start_iteration + 1 + self.warmup_steps
        self._times, self._tokens = [], []
        if self.peak_tflops is None:
            warnings.warn(f"MFU will not be reported: {self.peak_missing_reason}.", stacklevel=2)

    def add_step(self, iteration: int, step_time_s: float, tokens: Optional[int] = None) -> None:
        """The wall time of 1-based ``iteration`` (ignored while warming up), which trained on
        ``tokens`` (default ``tokens_per_step``, the full global batch)."""
        if iteration >= self._first_timed:
            self._times.append(step_time_s)
            self._tokens.append(self.tokens_per_step if tokens is None else tokens)

    def end_interval(self) -> dict:
        """The throughput and memory keys of the interval since the last call; starts the next."""
        times, tokens, self._times, self._tokens = self._times, self._tokens, [], []
        return {**self.interval_metrics(times, tokens), **memory_usage()}

    def interval_metrics(self, step_times: list[float],
                         step_tokens: Optional[list[int]] = None) -> dict:
        """The throughput keys of a record for an interval whose timed steps took ``step_times``
        and trained on ``step_tokens`` (default: ``tokens_per_step`` each)."""
        out = dict.fromkeys(("step_time_s", "tokens_per_sec_per_gpu", "tflops_per_gpu", "mfu",
                             "hfu"))
        out["timed_steps"] = len(step_times)
        if not step_times:
            return out
        step_time = sum(step_times) / len(step_times)
        total = sum(step_tokens) if step_tokens else self.tokens_per_step * len(step_times)
        tokens = total / (sum(step_times) * self.world_size)
        tflops = self.flops.flops_per_token * tokens / 1e12
        out.update(step_time_s=step_time, tokens_per_sec_per_gpu=tokens, tflops_per_gpu=tflops)
        if self.peak_tflops is not None:
            out["mfu"] = tflops / self.peak_tflops
            out["hfu"] = self.flops.hardware_flops_per_token * tokens / 1e12 / self.peak_tflops
        return out

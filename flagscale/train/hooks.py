"""The one interface through which optional behaviours plug into the training loop.

Loggers, throughput accounting, spike detection and profiling implement any of these methods; the
loop calls them in order and knows nothing else about them. Methods run on every rank; a hook that
writes files checks ``state.is_writer`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepInfo:
    """What one finished optimizer step reports; tensors stay on the device."""

    iteration: int
    """1-based iteration just completed."""
    step_time_s: float
    """Wall time of the step."""
    consumed_samples: int
    """Samples consumed by the whole run after this step."""
    lr: float
    """Learning rate used by this step."""
    grad_norm: Any = None
    """Global gradient norm (float), None when not computed."""
    skipped: bool = False
    """The optimizer skipped the step (non-finite gradients)."""
    sample_losses: Any = None
    """Per-row losses of this rank's microbatches, in order, as a device tensor; None on ranks
    that do not compute the loss (not the last pipeline stage, or TP rank > 0)."""


class Hook:
    """Base class with no-op methods; override what you need."""

    def on_train_start(self, state) -> None:
        pass

    def on_step_end(self, state, step: StepInfo) -> None:
        pass

    def on_log(self, state, record: dict) -> None:
        pass

    def on_save(self, state, checkpoint_dir) -> None:
        pass

    def on_train_end(self, state) -> None:
        pass

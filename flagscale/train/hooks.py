"""The one interface through which optional behaviours plug into the training loop.

Loggers, throughput accounting, spike detection and profiling implement any of these methods; the
loop calls them in order and knows nothing else about them. Methods run on every rank; a hook that
writes files checks ``state.is_writer`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepInfo:
    """What one finished optimizer step reports. Tensors stay on device until a log interval."""

    iteration: int
    """1-based iteration just completed."""
    step_time_s: float
    """Wall time of the step."""
    consumed_samples: int
    """Samples consumed by the whole run after this step."""
    lr: float
    """Learning rate used by this step."""
    loss: Any = None
    """Mean loss of the step as a 0-dim device tensor (None on ranks without the loss)."""
    grad_norm: Any = None
    """Global gradient norm (float), None when not computed."""
    skipped: bool = False
    """The optimizer skipped the step (non-finite gradients)."""
    sample_losses: Any = None
    """Per-sample losses of this rank's rows (device tensor) for tracing, when recorded."""
    extra: dict = field(default_factory=dict)


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

"""The one interface through which optional behaviours plug into the training loop.

A callback overrides any of the no-op methods below. :meth:`Trainer.fit
<flagscale.train.trainer.Trainer.fit>` calls each method on every callback in descending
``priority`` (ties keep the order the callbacks were given in), on every rank where the callback
exists. A callback decides itself when to act (``should_run``); the trainer only says which
iteration it is. ``self.trainer`` is set by the trainer before any method runs.

Per iteration the order is: ``pre_step`` -> the optimizer step -> ``add_to_step_summary`` -> the
step summary's one all-reduce -> ``post_step`` -> (when a record is due) ``pre_log_metrics`` on
every callback, then ``log_metrics`` on every callback. After the loop, or after an exception
anywhere in it, ``on_error`` (only after an exception) and then ``close`` run on every callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepInfo:
    """What one finished optimizer step reports; tensors stay on the device."""

    iteration: int
    """1-based iteration just completed."""
    grad_norm: float
    """Global gradient norm; nan when the update was dropped for a non-finite gradient."""
    sample_losses: Any
    """(loss sum, tokens) of each row of this rank's microbatches, in order, as a 2 x rows device
    tensor (under context parallelism, this rank's share of each row); None on ranks that do
    not compute the loss (not the last pipeline stage, or TP rank > 0)."""
    batch_size: int
    """Sequences in this step's global batch (fewer than ``train.global_batch_size`` during a
    batch-size ramp-up)."""
    summary: dict = field(default_factory=dict)
    """The step summary: each slot added in ``add_to_step_summary``, summed over every rank of
    the world, as a list of floats (see :class:`~flagscale.train.step_summary.StepSummary`)."""


class Callback:
    """Base class with no-op methods; override what you need."""

    priority: int = 0
    """Higher runs first, in every method."""

    trainer = None
    """The :class:`~flagscale.train.trainer.Trainer` running this callback."""

    def pre_train(self) -> None:
        """Once, after set-up (and after :meth:`load_state_dict` on a resume), before the first
        step."""

    def pre_step(self, iteration: int) -> None:
        """Before the optimizer step of 1-based ``iteration``."""

    def add_to_step_summary(self, step: StepInfo, summary) -> None:
        """After the optimizer step: ``summary.add`` the values of this step that every rank
        needs summed over the world; ``post_step`` reads the sums from ``step.summary``."""

    def post_step(self, step: StepInfo) -> None:
        """After the optimizer step; record metrics here with ``trainer.record_metric``."""

    def pre_log_metrics(self, iteration: int, metrics: dict) -> None:
        """A record is about to be written: add or change entries of ``metrics`` in place."""

    def log_metrics(self, iteration: int, metrics: dict) -> None:
        """Write the finished record (``metrics`` holds ``iteration`` too); do not change it."""

    def post_checkpoint_saved(self, path) -> None:
        """A complete checkpoint now exists at ``path``."""

    def on_error(self, exc: BaseException) -> None:
        """The run failed with ``exc``; :meth:`close` follows."""

    def close(self) -> None:
        """Release files, runs and threads; called once, whether the run ended or failed."""

    def state_dict(self) -> dict:
        """State to keep in every checkpoint (picklable; identical on every rank, since rank 0's
        copy is the one saved); empty when there is none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, on a resume."""

"""Periodic and final checkpoints (``checkpoint.save_interval``, ``save_final``)."""

from __future__ import annotations

from flagscale.train.callbacks.base import Callback, StepInfo


class CheckpointCallback(Callback):
    """Saves every ``interval`` iterations and, with ``save_final``, after the run's last one.

    Runs after the callbacks that change their state in ``post_step`` (spike window, evaluation),
    so a checkpoint holds their state after the step it saves.
    """

    priority = 100

    def __init__(self, interval: int, save_final: bool):
        self.interval = interval
        self.save_final = save_final

    def should_run(self, iteration: int) -> bool:
        last = iteration == self.trainer.end_iteration
        return iteration % self.interval == 0 or (last and self.save_final)

    def post_step(self, step: StepInfo) -> None:
        if self.should_run(step.iteration):
            self.trainer.save_checkpoint()

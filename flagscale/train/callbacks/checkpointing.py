"""Periodic and final checkpoints (``checkpoint.save_interval``, ``save_final``), written in the
background with ``checkpoint.async_save``."""

from __future__ import annotations

from flagscale.train.callbacks.base import Callback, StepInfo


class CheckpointCallback(Callback):
    """Saves every ``interval`` iterations and, with ``save_final``, after the run's last one.

    Runs after the callbacks that change their state in ``post_step`` (spike window, evaluation),
    so a checkpoint holds their state after the step it saves.

    With ``checkpoint.async_save`` a save returns once its tensors are staged to host; the
    background writes are completed (renamed, ``latest`` moved) before each following step
    where every rank has finished, and waited for at :meth:`close`.
    """

    priority = 100

    def __init__(self, interval: int, save_final: bool):
        self.interval = interval
        self.save_final = save_final
        self._failed = False

    def should_run(self, iteration: int) -> bool:
        last = iteration == self.trainer.end_iteration
        return iteration % self.interval == 0 or (last and self.save_final)

    def pre_step(self, iteration: int) -> None:
        self.trainer.finish_saves(blocking=False)

    def post_step(self, step: StepInfo) -> None:
        if self.should_run(step.iteration):
            self.trainer.save_checkpoint(background=self.trainer.cfg.checkpoint.async_save)

    def on_error(self, exc: BaseException) -> None:
        self._failed = True

    def close(self) -> None:
        # After a failure the other ranks may never join the completion's collectives: leave the
        # unfinished saves as .partial directories, which no resume reads.
        if self._failed:
            self.trainer.saves.abandon()
        else:
            self.trainer.finish_saves(blocking=True)

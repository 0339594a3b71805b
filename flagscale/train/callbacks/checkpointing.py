"""Periodic and final checkpoints (``checkpoint.save_interval``, ``save_final``), written in the
background with ``checkpoint.async_save``; ``checkpoint.keep_last``: older checkpoints deleted in
the background."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Optional

from flagscale.checkpoint import retire_checkpoints
from flagscale.train.callbacks.base import Callback, StepInfo


class CheckpointCallback(Callback):
    """Saves every ``interval`` iterations and, with ``save_final``, after the run's last one.

    Runs after the callbacks that change their state in ``post_step`` (spike window, evaluation),
    so a checkpoint holds their state after the step it saves.

    With ``checkpoint.keep_last``, the writer rank renames the checkpoints beyond the newest
    ``keep_last`` (:func:`~flagscale.checkpoint.retire_checkpoints`) right after each save and
    deletes them in a background thread, so training does not wait for the file system;
    :meth:`close` waits for the deletion.

    With ``checkpoint.async_save`` a save returns once its tensors are staged to host; the
    background writes are completed (renamed, ``latest`` moved) before each following step
    where every rank has finished, and waited for at :meth:`close`.
    """

    priority = 100

    def __init__(self, interval: int, save_final: bool):
        self.interval = interval
        self.save_final = save_final
        self._deleting: Optional[threading.Thread] = None
        self._failed = False

    def should_run(self, iteration: int) -> bool:
        last = iteration == self.trainer.end_iteration
        return iteration % self.interval == 0 or (last and self.save_final)

    def pre_step(self, iteration: int) -> None:
        self.trainer.finish_saves(blocking=False)

    def post_step(self, step: StepInfo) -> None:
        if self.should_run(step.iteration):
            self.trainer.save_checkpoint(background=self.trainer.cfg.checkpoint.async_save)

    def post_checkpoint_saved(self, path) -> None:
        keep_last = self.trainer.cfg.checkpoint.keep_last
        if not (keep_last and self.trainer.is_writer):
            return
        self._join()
        retired = retire_checkpoints(Path(path).parent, keep_last)
        if retired:
            self._deleting = threading.Thread(target=_delete, args=(retired,),
                                              name="flagscale-keep-last", daemon=False)
            self._deleting.start()

    def on_error(self, exc: BaseException) -> None:
        self._failed = True

    def close(self) -> None:
        # After a failure the other ranks may never join the completion's collectives: leave the
        # unfinished saves as .partial directories, which no resume reads.
        if self._failed:
            self.trainer.saves.abandon()
        else:
            self.trainer.finish_saves(blocking=True)
        self._join()

    def _join(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None


def _delete(paths: list[Path]) -> None:
    for path in paths:
        # A failed deletion leaves a .deleting directory, which nothing reads and the next
        # retire_checkpoints removes again.
        shutil.rmtree(path, ignore_errors=True)

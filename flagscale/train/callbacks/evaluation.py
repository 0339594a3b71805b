"""Validation passes every ``train.eval_interval`` iterations."""

from __future__ import annotations

from flagscale.errors import ConfigError
from flagscale.train.callbacks.base import Callback, StepInfo


class EvaluationCallback(Callback):
    """Runs ``train.eval_iterations`` forward-only batches of the validation split every
    ``interval`` iterations and records their global mean loss as ``valid_loss``.

    Each pass reads its own batches (pass k reads validation batches k*eval_iterations onwards), so
    the passes of a run, resumed or not, never share a sample. The record is logged at the
    iteration it was measured even when that is not a log iteration: a validation loss is logged
    next to the training metrics of its own step, never folded into a later record.
    """

    priority = 200

    def __init__(self, interval: int):
        self.interval = interval

    def should_run(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    def pre_train(self) -> None:
        trainer = self.trainer
        if trainer.valid_dataset is None:
            cfg = trainer.cfg
            raise ConfigError(f"train.eval_interval={self.interval} asks for validation every "
                              f"{self.interval} iterations, but data.split={cfg.data.split!r} "
                              f"gives the validation split no documents. Give it a share (e.g. "
                              f"data.split=98,2,0) or set train.eval_interval=0.")

    def post_step(self, step: StepInfo) -> None:
        if self.should_run(step.iteration):
            loss = self.trainer.evaluate(step.iteration // self.interval - 1)
            self.trainer.record_metric("valid_loss", loss, log_now=True)

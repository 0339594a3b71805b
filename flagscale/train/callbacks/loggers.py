"""The metrics loggers (console, ``metrics.jsonl``, wandb, TensorBoard) as callbacks."""

from __future__ import annotations

from flagscale.train.callbacks.base import Callback


class LoggerCallback(Callback):
    """Drives one logger of :mod:`flagscale.metrics.loggers`: opens it before training, writes
    every record, and closes it at the end, marked failed after an exception (a crashed run
    still flushes ``metrics.jsonl`` and finishes its wandb run)."""

    priority = -200

    def __init__(self, logger):
        self.logger = logger
        self._failed = False

    def pre_train(self) -> None:
        self.logger.open(self.trainer.start_iteration)

    def log_metrics(self, iteration: int, metrics: dict) -> None:
        self.logger.write(metrics)

    def on_error(self, exc: BaseException) -> None:
        self._failed = True

    def close(self) -> None:
        self.logger.close(failed=self._failed)

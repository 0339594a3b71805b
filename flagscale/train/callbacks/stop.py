"""Stop on SIGUSR1, SIGTERM or SIGINT: every rank finishes the same step, saves, and exits.

Slurm sends SIGUSR1 before the time limit (the generated script asks for it) and SIGTERM on
preemption or ``scancel``; ``flagscale train`` forwards Ctrl-C, SIGTERM and SIGUSR1 to its workers.
Signals reach the ranks at different moments, so a rank only notes it (:class:`StopRequest`), and
every step :class:`StopOnSignalCallback` adds that note to the step summary (one slot per stop
signal, so its all-reduce counts the ranks that received each): the first step whose summary
follows any rank's signal is the last one everywhere. The run then saves a
complete checkpoint of that step (unless the periodic save just did) and the worker exits with
:data:`~flagscale.platform.lifetime.EXIT_REQUEUE`.

A further signal while stopping is only acknowledged: the save runs to its end (a save is
written as ``.partial`` and renamed, so even a SIGKILL cannot leave a damaged checkpoint behind
``latest``). A signal before the training loop starts (set-up, loading) stops the process at once:
nothing new to save.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

from flagscale.train.callbacks.base import Callback, StepInfo

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(BaseException):
    """Raised by a stop signal that arrives before the training loop (a BaseException, so no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} before training started")
        self.signum = signum


class StopRequest:
    """This rank's stop signals: the first one is noted, later ones only acknowledged."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.in_loop = False
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        """Handle :data:`STOP_SIGNALS` in this process until :meth:`uninstall`; Python lets only
        the main thread set handlers, elsewhere (a trainer in a thread) nothing is installed."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def uninstall(self, ignore: bool = False) -> None:
        """Give the signals back to the handlers that were there before :meth:`install`, or,
        with ``ignore``, have the kernel ignore them from now on."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if ignore else handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"flagscale: {signal.Signals(signum).name} ignored: already stopping on "
                  f"{self.name} (saving, then exiting)", file=sys.stderr, flush=True)
            return
        self.signum = signum
        if not self.in_loop:
            raise StoppedBySignal(signum)


class StopOnSignalCallback(Callback):
    """Agree on a stop after each step, save, and end the loop (see the module docstring).

    Runs after every other callback's ``post_step`` (periodic checkpoint, evaluation), so the
    saved state holds theirs for this step.
    """

    priority = -1000

    def __init__(self, request: StopRequest):
        self.request = request
        self.saved_iteration: Optional[int] = None
        self.stopped = False

    def pre_train(self) -> None:
        self.request.in_loop = True

    def close(self) -> None:
        # After a stop, ignore signals until the process has exited: torchrun's agent SIGTERMs
        # the workers still tearing down as soon as the first one exits, which would turn their
        # requeue status into "killed". (A Python handler would not do: the interpreter resets
        # them to the default action while it finalizes.)
        self.request.uninstall(ignore=self.stopped)

    def post_checkpoint_saved(self, path) -> None:
        self.saved_iteration = self.trainer.iteration

    def add_to_step_summary(self, step: StepInfo, summary) -> None:
        # Three slots in the step's one all-reduce (no collective of its own): what lets every
        # rank stop at the same step.
        summary.add("stop_signals", [float(self.request.signum == s) for s in STOP_SIGNALS])

    def post_step(self, step: StepInfo) -> None:
        received = [s for s, ranks in zip(STOP_SIGNALS, step.summary["stop_signals"]) if ranks]
        if not received:
            return
        # Ranks may have received different signals: name the highest-numbered one everywhere.
        signum = max(received)
        trainer = self.trainer
        if trainer.is_writer:
            print(f"flagscale: stopping on {signal.Signals(signum).name} after iteration "
                  f"{step.iteration}: saving a checkpoint", flush=True)
        if self.saved_iteration != step.iteration:
            trainer.save_checkpoint()
        self.stopped = True
        # The loop ends after this step, which also makes it a logged record.
        trainer.end_iteration = step.iteration

"""Start and supervise the worker processes of one machine (torchrun's elastic agent, run in this
process), so that what happens to the launcher happens to the whole run.

    flagscale train CONFIG --nproc 2        # run_local(2, ["train", CONFIG]) in the CLI process
    python -m flagscale.launch.local --nnodes=... --nproc-per-node=8 ... -m flagscale train CFG
                                            # one per node in the generated sbatch script

What it adds to plain ``torchrun`` (``torch.distributed.run``, whose arguments it takes):

- **Stop signals reach the workers.** torchrun starts each worker in a session of its own, so a
  Ctrl-C or a ``kill`` of the launcher does not reach them. SIGINT, SIGTERM and SIGUSR1 to this
  process are forwarded once to every worker, which saves after its current step and exits with
  :data:`~flagscale.platform.lifetime.EXIT_REQUEUE`; a second Ctrl-C aborts (SIGKILL to the
  workers' process groups: a checkpoint being written stays ``.partial`` and ``latest`` keeps
  naming the previous complete one). torchrun's own handlers for these signals are turned off
  (``--signals-to-handle``): they would SIGTERM the workers' whole process groups,
  checkpoint writers included, and SIGKILL them 30 s later, in the middle of a save.
- **Nothing outlives the launcher.** Every worker sets a parent-death signal at start
  (:func:`flagscale.platform.lifetime.die_with_parent`, via ``FLAGSCALE_LAUNCHER_PID``), so a
  ``kill -9`` of this process takes the workers, and with them their checkpoint writers, along.
- **One error paragraph.** A worker that fails with a :class:`~flagscale.errors.FlagScaleError`
  writes its message to torchrun's per-worker error file instead of printing it
  (:func:`report_worker_error`); this process prints each distinct message once and exits with
  the workers' exit code, without torchrun's ``ChildFailedError`` dump.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

# Imported here, not in the signal handler: a signal can arrive while torchrun's agent is itself
# importing psutil, and the handler would then see the half-initialised module.
import psutil

from flagscale.platform.lifetime import EXIT_REQUEUE

LAUNCHER_ENV = "FLAGSCALE_LAUNCHER_PID"
"""Set for the workers to the pid of the launcher supervising them: they die with it and leave
their error messages to it."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def torchrun_args(nproc: int, module_args: Sequence[str], module: str = "flagscale") -> list[str]:
    """torchrun's arguments for ``nproc`` local workers running ``python -m MODULE ARGS``.

    ``--standalone`` lets the c10d rendezvous pick a free local port, so several runs (and test
    processes) on one machine never collide.
    """
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", module, *module_args]


def run_local(nproc: int, module_args: Sequence[str], env: dict | None = None,
              module: str = "flagscale") -> int:
    """Run ``python -m MODULE <module_args>`` (default: the ``flagscale`` command) on ``nproc``
    local workers supervised by this process; returns the run's exit code."""
    os.environ.update(env or {})
    return run_agent(torchrun_args(nproc, module_args, module))


def run_agent(args: Sequence[str]) -> int:
    """Run torchrun with ``args`` in this process (see the module docstring); returns the exit
    code: 0, :data:`EXIT_REQUEUE` when the workers stopped on a signal after saving, else the
    failing worker's code (128 + N for a worker killed by signal N)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun otherwise warns and sets 1 thread; keep it explicit and overridable.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launcher_env = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    forwarder = _Forwarder()
    previous = {sig: signal.signal(sig, forwarder) for sig in STOP_SIGNALS}
    # The agent logs every worker exit and its own shutdown as warnings and errors; what a user
    # needs from them is printed below, once.
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--signals-to-handle=SIGHUP,SIGQUIT", *args]))
        return 0
    except ChildFailedError as exc:
        return _report_failures(exc.failures, forwarder.aborted)
    finally:
        elastic_log.setLevel(level)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if launcher_env is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = launcher_env


class _Forwarder:
    """Signal handler of the launcher: forward the first stop signal, abort on a second Ctrl-C."""

    def __init__(self):
        self.received: Optional[int] = None
        self.aborted = False

    def __call__(self, signum, frame) -> None:
        workers = _worker_pids()
        if self.received is None:
            self.received = signum
            print(f"flagscale: {signal.Signals(signum).name}: the workers save after their current "
                  f"step and stop" + (" (Ctrl-C again to abort without saving)"
                                      if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
            for pid in workers:
                _signal(pid, signum)
        elif signum == signal.SIGINT and not self.aborted:
            self.aborted = True
            print("flagscale: aborting: killing the workers (the checkpoint being written, if "
                  "any, is discarded; `latest` still names the last complete one)",
                  file=sys.stderr, flush=True)
            for pid in workers:
                # Each worker leads its own process group (torchrun's start_new_session), which
                # holds its checkpoint writers too.
                _signal(pid, signal.SIGKILL, group=True)


def _worker_pids() -> list[int]:
    """The agent runs in this process, so its workers are this process's children."""
    return [child.pid for child in psutil.Process().children()]


def _signal(pid: int, signum: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _report_failures(failures: dict, aborted: bool) -> int:
    """Print what the failed workers reported, each distinct message once; return the exit code."""
    reported: dict[str, list[int]] = {}
    for rank, failure in sorted(failures.items()):
        message = failure.error_file_data.get("flagscale_message")
        if message:
            reported.setdefault(message, []).append(rank)
    for message, ranks in reported.items():
        where = "" if len(reported) == 1 else f" [rank {', '.join(map(str, ranks))}]"
        print(message + where, file=sys.stderr, flush=True)
    if aborted:
        return 128 + signal.SIGINT
    if reported:
        # The status the worker chose, even if it was then killed while exiting (the agent
        # SIGTERMs the others as soon as one worker has failed).
        rank = next(iter(reported.values()))[0]
        return int(failures[rank].error_file_data.get("flagscale_exit_code", 1))
    if all(f.exitcode == EXIT_REQUEUE for f in failures.values()):
        return EXIT_REQUEUE
    # The root cause, not the workers the agent then stopped with SIGTERM.
    _, _, rank = min((f.exitcode == -signal.SIGTERM, f.timestamp, r) for r, f in failures.items())
    failure = failures[rank]
    if failure.exitcode < 0:
        print(f"flagscale: worker rank {rank} (pid {failure.pid}) was killed by "
              f"{failure.signal_name()}", file=sys.stderr, flush=True)
        return 128 - failure.exitcode
    return failure.exitcode


def report_worker_error(message: str, exit_code: int = 1) -> bool:
    """In a worker of :func:`run_agent`, hand ``message`` (one paragraph) to the launcher, which
    prints it once for all ranks and exits with ``exit_code``; returns False when this process is
    not such a worker (the caller then prints it itself)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file or LAUNCHER_ENV not in os.environ:
        return False
    # torchrun's error-file format ("message" and "timestamp"), plus our own keys so the launcher
    # tells flagscale's paragraphs from torch's tracebacks.
    with open(error_file, "w") as f:
        json.dump({"message": message, "timestamp": int(time.time()),
                   "flagscale_message": message, "flagscale_exit_code": exit_code}, f)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m flagscale.launch.local TORCHRUN_ARGS``: :func:`run_agent` as a command."""
    return run_agent(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

"""Process lifetime: every process of a run dies with the process that started it.

A run is a tree: the launcher (``flagscale train`` or, on Slurm, one agent per node) starts the
workers, and each worker starts megatron-core's checkpoint writers (a ``spawn`` multiprocessing
Manager serving the results queue, and ``fork`` writer processes per save, see
``megatron/core/dist_checkpointing/strategies/filesystem_async.py``). torchrun puts every worker in
a session of its own, so a ``kill -9`` of the launcher's process group does not reach the workers,
and nothing reaches the writers; they would train or wait on forever.

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) closes that gap link by link: the kernel
sends SIGKILL to a process the moment its parent exits. It is cleared in a ``fork`` child, so it is
set again in each: :func:`die_with_parent` for the process itself, :func:`children_die_with_me` for
every later ``fork`` of it, and :func:`start_checkpoint_queue_manager` for the spawned Manager.
On other systems these are no-ops (nothing there offers the same guarantee).
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_REQUEUE = 75
"""Exit status of a run stopped by SIGUSR1, SIGTERM or Ctrl-C after saving a complete checkpoint:
continue it with ``checkpoint.load=auto`` (the generated sbatch script requeues the job on it).
75 is ``EX_TEMPFAIL`` of ``<sysexits.h>`` ("temporary failure, retry"), distinct from an error (1)
and from a process killed by a signal (128 + N)."""

PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""

_fork_parent = 0
"""Pid of the process that is forking (set before each fork, read in the child)."""


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; exit at once if the parent
    (``parent_pid`` when given) is already gone. Returns False where the OS cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    # The parent may have died between our start and the prctl: then we were re-parented already
    # and no signal will come.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(128 + signal.SIGKILL)
    return True


def _before_fork() -> None:
    global _fork_parent
    _fork_parent = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_fork_parent)


_registered = False


def children_die_with_me() -> None:
    """From now on every ``fork`` child of this process (and of those children) dies with its
    parent. ``subprocess`` and ``spawn`` children exec a new program and are not covered: start
    them with :func:`die_with_parent` themselves."""
    global _registered
    if _registered or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _registered = True


def _manager_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # The Manager shares the worker's process group: a stop signal meant for the worker (which
    # saves, then exits) must not end the server the save is using. It still dies with the worker.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def start_checkpoint_queue_manager() -> None:
    """Start megatron-core's checkpoint-writer results queue now, in a Manager that dies with this
    process and ignores the stop signals the run's launcher forwards.

    megatron-core 0.16.1 creates it lazily on the first save (``_get_write_results_queue``: a
    ``spawn`` Manager, a fresh interpreter whose parent-death signal is unset) and keeps it for the
    process's life; a worker killed with SIGKILL leaves that server behind, blocked forever. Setting
    the module's queue first, from a Manager started with an initializer, is the one hook it leaves.
    """
    if not sys.platform.startswith("linux"):
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_manager_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    # Keep the manager referenced (its finalizer shuts the server down at a normal exit).
    filesystem_async._flagscale_results_manager = manager

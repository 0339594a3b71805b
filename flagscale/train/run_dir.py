"""One run per run directory, and a resume that continues the same experiment.

- ``run.dir/.lock`` (host, pid, start time, Slurm job, command) is created with ``O_EXCL`` by rank 0
  before anything else is written there, and removed when that process exits. A lock whose
  process is gone (same host, pid not running or reused since) or that an earlier attempt of the
  same Slurm job left (a requeued job keeps its id) is taken over with a note; any other lock
  stops the run with an error naming the holder.
- :func:`check_run_dir` refuses, before any work: a run with ``checkpoint.load=auto`` whose config
  differs from the one of the checkpoint it would resume in keys that may not change on a resume
  (:data:`flagscale.config.history.RESUMABLE_CHANGES`), unless ``run.allow_config_change``; and a
  run that would start over a directory holding another run's checkpoints (it would overwrite
  them).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from flagscale.checkpoint import complete_checkpoints, latest_checkpoint
from flagscale.config import Config, config_to_dict
from flagscale.config.history import config_changes
from flagscale.errors import CheckpointError, ConfigError, FlagScaleError

LOCK_NAME = ".lock"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv)}


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {started}: "
            f"{holder.get('command') or '?'})")


def _read(lock: Path) -> Optional[dict]:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # torn or foreign: its writer died between create and write


def stale_reason(holder: dict) -> Optional[str]:
    """Why the lock ``holder`` wrote no longer holds, or None while it may still run."""
    if not holder:
        return "the lock file is empty or unreadable"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid():
        return f"it was left by an earlier attempt of this Slurm job ({job})"
    if holder.get("host") != socket.gethostname():
        return None  # another machine's processes cannot be checked from here
    import psutil

    try:
        created = psutil.Process(int(holder["pid"])).create_time()
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return f"process {holder.get('pid')} is not running"
    if created > float(holder.get("started", 0)) + 1:
        return f"pid {holder['pid']} now belongs to a process started after the lock"
    return None


def _in_use(run_dir: Path, lock: Path, holder: dict) -> ConfigError:
    return ConfigError(
        f"run.dir {run_dir} is in use by another run: {lock} names {_describe(holder)}. Two "
        f"runs in one directory overwrite each other's checkpoints. Wait for that run or stop it, "
        f"or give this one another run.dir; if that process is gone for good (e.g. its machine "
        f"went down), delete {lock}.")


class RunDirLock:
    """``run_dir/.lock`` held by this process (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over. Raises ConfigError
        naming the holder when another live run has it."""
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile
                reason = stale_reason(holder)
                if reason is None:
                    raise _in_use(self.run_dir, self.path, holder) from None
                if self._take_over(holder):
                    note = (f"flagscale: took over the stale lock {self.path} of "
                            f"{_describe(holder)}: {reason}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            self.held = True
            atexit.register(self.release)
            return note
        raise ConfigError(f"Could not take the lock {self.path}: other processes keep creating "
                          f"it. Is another run starting in run.dir {self.run_dir}?")

    def _take_over(self, stale: dict) -> bool:
        # Move the stale lock aside, then check that what moved is the lock judged stale: another
        # process may have taken it over and written its own meanwhile (then put that one back).
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        if _read(aside) != stale:
            os.replace(aside, self.path)
            return False
        aside.unlink()
        return True

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        if self.held and (_read(self.path) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def check_run_dir(cfg: Config) -> Optional[Path]:
    """Refuse a run that ``cfg.run.dir`` cannot host (see the module docstring); returns the
    checkpoint ``checkpoint.load=auto`` resumes, if any. Reads only."""
    run_dir = Path(cfg.run.dir)
    lock = run_dir / LOCK_NAME
    holder = _read(lock)
    if holder and holder.get("pid") != os.getpid() and stale_reason(holder) is None:
        raise _in_use(run_dir, lock, holder)
    checkpoints = run_dir / "checkpoints"
    if cfg.checkpoint.load != "auto":
        existing = complete_checkpoints(checkpoints)
        if existing:
            start = (f"starts from {cfg.checkpoint.load}" if cfg.checkpoint.load
                     else "starts fresh")
            raise CheckpointError(
                f"run.dir {run_dir} already holds checkpoints of a run ({existing[-1].name} the "
                f"newest); this run {start} and would overwrite them. Continue that run with "
                f"checkpoint.load=auto, or give this run a new run.dir.")
        return None
    checkpoint = latest_checkpoint(checkpoints)
    if checkpoint is None:
        return None
    saved = _saved_config(checkpoint)
    changes = config_changes(saved, config_to_dict(cfg)) if saved else []
    if changes and not cfg.run.allow_config_change:
        raise ConfigError(
            f"checkpoint.load=auto would resume {checkpoint}, trained with another config: "
            f"{'; '.join(changes)}. A resume may change only the run's length, intervals, layout "
            f"and reporting. To start a new experiment give it a new run.dir (and "
            f"checkpoint.load={checkpoint} to start from these weights); to continue this run "
            f"with these changes anyway set run.allow_config_change=true.")
    return checkpoint


def _saved_config(checkpoint: Path) -> dict:
    """The resolved config a checkpoint's run was trained with (its ``flagscale_config.yaml``);
    {} when it has none (e.g. imported from Hugging Face)."""
    path = checkpoint / "flagscale_config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); it records the config the "
                              f"checkpoint was trained with.") from None


def claim_run_dir(cfg: Config, is_writer: bool) -> Optional[RunDirLock]:
    """Collective: on the writer rank create ``run.dir``, take its lock and run
    :func:`check_run_dir`; every rank raises the writer's error, if any, so all stop alike.
    Returns the lock on the writer rank (released at process exit)."""
    import torch.distributed as dist

    lock, failure = None, None
    if is_writer:
        try:
            Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
            lock = RunDirLock(cfg.run.dir)
            note = lock.acquire()
            if note:
                print(note, flush=True)
            check_run_dir(cfg)
        except FlagScaleError as exc:
            if lock is not None:
                lock.release()
            failure = (type(exc), str(exc))
    shared = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        kind, message = shared[0]
        raise kind(message)
    return lock

"""Start N local worker processes with torchrun (one machine: CPU processes or GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence


def torchrun_command(nproc: int, module_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m flagscale ...``.

    ``--standalone`` lets the c10d rendezvous pick a free local port, so several runs (and test
    processes) on one machine never collide.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "flagscale", *module_args]


def run_local(nproc: int, module_args: Sequence[str], env: dict | None = None) -> int:
    """Run ``flagscale <module_args>`` on ``nproc`` local workers; returns the exit code."""
    environment = {**os.environ, **(env or {})}
    # torchrun otherwise warns and sets 1 thread; keep it explicit and overridable.
    environment.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_command(nproc, module_args), env=environment)

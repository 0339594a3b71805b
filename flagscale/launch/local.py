"""Start N local worker processes with torchrun (one machine: CPU processes or GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence


def torchrun_command(nproc: int, module_args: Sequence[str],
                     module: str = "flagscale") -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ...``.

    ``--standalone`` lets the c10d rendezvous pick a free local port, so several runs (and test
    processes) on one machine never collide.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *module_args]


def run_local(nproc: int, module_args: Sequence[str], env: dict | None = None,
              module: str = "flagscale") -> int:
    """Run ``python -m MODULE <module_args>`` (default: the ``flagscale`` command) on ``nproc``
    local workers; returns the exit code."""
    environment = {**os.environ, **(env or {})}
    # torchrun otherwise warns and sets 1 thread; keep it explicit and overridable.
    environment.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_command(nproc, module_args, module), env=environment)

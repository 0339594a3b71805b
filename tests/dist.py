"""The one helper that runs test code on real multi-process groups.

``run_distributed(fn, nproc=2, *args)`` starts ``nproc`` processes, each with RANK/WORLD_SIZE/
MASTER_ADDR set like torchrun would, calls ``fn(*args)`` in each (``fn`` must be importable: a
module-level function), and returns every rank's return value in rank order. The backend follows
the platform: gloo on CPU processes, NCCL where the GPUs exist. A failing rank fails the test
with its traceback.

``run_cli(*args)`` runs the ``flagscale`` console command the way a user does (it starts its own
torchrun workers for training) and returns the completed process.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, nproc: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        result = ("ok", fn(*args))
    except BaseException:  # report every failure, including assertion errors, to the parent
        result = ("error", traceback.format_exc())
    with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, nproc: int = 2, *args, timeout: float = 600):
    """Run ``fn(*args)`` on ``nproc`` real processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_worker, args=(fn, r, nproc, port, out, args))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                for q in procs:
                    q.kill()
                raise TimeoutError(f"distributed test did not finish within {timeout}s")
        results = []
        for rank in range(nproc):
            path = Path(out) / f"{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} died without a result "
                                   f"(exit code {procs[rank].exitcode})")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


def run_cli(*args: str, check: bool = True, timeout: float = 600,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m flagscale ARGS``; on ``check`` a non-zero exit fails with its output."""
    proc = subprocess.run([sys.executable, "-m", "flagscale", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"flagscale {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_losses(run_dir: Path) -> dict[int, float]:
    """The loss of every iteration a run's ``metrics.jsonl`` records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records}


def tiny_config(path: Path, corpus: str, tokenizer: str, run_dir: Path, **sections) -> Path:
    """Write a tiny-model (fp32) run config on ``corpus``/``tokenizer`` under ``run_dir`` to
    ``path``; each ``sections`` entry updates that section (e.g. ``train={"iterations": 6}``)."""
    import yaml

    cfg = {"model": {"preset": "tiny", "params_dtype": "fp32"},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 32,
                     "log_interval": 1, "seed": 7},
           "data": {"paths": [corpus], "tokenizer": tokenizer},
           "run": {"dir": str(run_dir)}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path

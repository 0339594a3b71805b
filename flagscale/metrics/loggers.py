"""Writers of the per-interval metrics record: console, ``metrics.jsonl``, wandb, TensorBoard.

Every logger has the same three methods: ``open(start_iteration)`` once before training,
``write(record)`` for each record (a flat dict whose ``iteration`` key says which step it ends),
and ``close(failed)`` once at the end, also after a crash. The training loop builds them with
:func:`flagscale.metrics.build_loggers` on the writer rank only and drives them from a callback;
nothing here knows about the loop. Adding a logger is one class here plus one line in
``build_loggers``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Optional

from flagscale.errors import ConfigError
from flagscale.metrics.jsonl import read_records


def _fmt(value, spec: str) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else format(value, spec)


def scalars(record: dict) -> dict[str, float]:
    """The finite numeric entries of a record (what chart-drawing loggers can plot)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class ConsoleLogger:
    """One line per record on stdout."""

    def __init__(self, iterations: int):
        self.iterations = iterations

    def open(self, start_iteration: int) -> None:
        pass

    def write(self, record: dict) -> None:
        parts = [f"iter {record['iteration']:>6d}/{self.iterations}",
                 f"loss {_fmt(record.get('loss'), '.4f')}"]
        if "valid_loss" in record:
            parts.append(f"valid_loss {_fmt(record['valid_loss'], '.4f')}")
        parts += [f"lr {_fmt(record.get('lr'), '.3e')}",
                  f"grad_norm {_fmt(record.get('grad_norm'), '.3f')}",
                  f"step {_fmt(record.get('step_time_s'), '.3f')}s",
                  f"tok/s/gpu {_fmt(record.get('tokens_per_sec_per_gpu'), ',.0f')}",
                  f"TFLOP/s/gpu {_fmt(record.get('tflops_per_gpu'), '.4g')}"]
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.3g}%")
        if record.get("memory_gib") is not None:
            parts.append(f"mem {record['memory_gib']:.2f}GiB")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self, failed: bool = False) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per log interval to ``run.dir/metrics.jsonl``.

    Lines are flushed as they are written, so a crashed run keeps every interval it logged. At
    open, records past the iteration the run starts from are dropped (they belong to work after
    the checkpoint that is about to be redone), so the file always holds one history; so is a
    last line cut short by a crash (:func:`~flagscale.metrics.jsonl.read_records`).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def open(self, start_iteration: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [record for record in read_records(self.path, "iteration")
                    if record["iteration"] <= start_iteration]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self._file is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self._file.write(json.dumps(clean) + "\n")

    def close(self, failed: bool = False) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger:
    """Logs every record to Weights & Biases, keyed by iteration.

    Offline (files under ``run.dir/wandb``, upload later with ``wandb sync``) unless
    ``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise. The run id is kept in
    ``run.dir/wandb/run_id`` so a resumed run continues the same W&B run. A crashed run is
    finished with exit code 1, so W&B marks it failed instead of leaving it running.
    """

    def __init__(self, project: str, name: str, config: dict, run_dir: Path):
        self.project = project
        self.name = name
        self.config = config
        self.run_dir = Path(run_dir)
        self.run = None

    def open(self, start_iteration: int) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                                else "offline")
        id_file = self.run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        # console="off": the training output stays on stdout untouched; no system-stats sampler
        # thread competing with the training processes for CPU.
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
        self.run = wandb.init(project=self.project, name=self.name, id=run_id, resume="allow",
                              config=self.config, dir=str(self.run_dir), mode=mode,
                              settings=settings)

    def write(self, record: dict) -> None:
        if self.run is not None:
            values = scalars(record)
            step = int(values.pop("iteration"))
            self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(f"metrics.tensorboard=true but TensorBoard cannot be imported ({exc}). "
                          f"Install it (pip install tensorboard) or set "
                          f"metrics.tensorboard=false.") from None
    return SummaryWriter


class TensorBoardLogger:
    """Writes every numeric entry of the record as a scalar under ``run.dir/tensorboard``."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer_class = tensorboard_writer_class()
        self._writer = None

    def open(self, start_iteration: int) -> None:
        self._writer = self._writer_class(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        if self._writer is not None:
            values = scalars(record)
            step = int(values.pop("iteration"))
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def run_name(run_dir: Path, name: Optional[str]) -> str:
    """The human-readable run name: ``run.name``, else the run directory's name."""
    return name or Path(run_dir).resolve().name

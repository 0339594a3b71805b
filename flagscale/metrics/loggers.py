"""Writers of the per-interval metrics record: console and ``metrics.jsonl``.

All writers receive the same record (a flat dict) through the training-loop hook ``on_log``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from flagscale.train.hooks import Hook


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


class ConsoleLogger(Hook):
    """One line per log interval on the writer rank."""

    def on_log(self, state, record: dict) -> None:
        if not state.is_writer:
            return
        parts = [f"iter {record['iteration']:>6d}/{state.cfg.train.iterations}",
                 f"loss {_fmt(record.get('loss'), '.4f')}",
                 f"lr {_fmt(record.get('lr'), '.3e')}",
                 f"grad_norm {_fmt(record.get('grad_norm'), '.3f')}",
                 f"step {_fmt(record.get('step_time_s'), '.3f')}s",
                 f"tok/s/gpu {_fmt(record.get('tokens_per_sec_per_gpu'), ',.0f')}"]
        if record.get("tflops_per_gpu") is not None:
            parts.append(f"TFLOP/s/gpu {_fmt(record['tflops_per_gpu'], '.2f')}")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        print(" | ".join(parts), file=sys.stdout, flush=True)


class JsonlLogger(Hook):
    """Appends one JSON object per log interval to ``run.dir/metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def on_train_start(self, state) -> None:
        if state.is_writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)

    def on_log(self, state, record: dict) -> None:
        if self._file is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self._file.write(json.dumps(clean) + "\n")

    def on_train_end(self, state) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

"""Reading the JSONL files a run appends to while it trains (``metrics.jsonl``, trace reports).

A run killed mid-write (kill -9, a node failure, a full disk) leaves its last line cut short.
That line is dropped with a warning naming the file, so a resume, a plot or a trace goes on with
every complete record; a bad line anywhere else was not written by the run, and is an error
naming the file and the line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from flagscale.errors import DataError


def read_records(path: Path, key: str) -> list[dict]:
    """The JSON objects of ``path``, one per non-blank line, in order; each must hold an integer
    ``key`` (e.g. ``iteration``). See the module doc for lines that do not parse."""
    path = Path(path)
    lines = [(number, line) for number, line in
             enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as exc:
            if index == len(lines) - 1:
                warnings.warn(f"{path}: dropped line {number}, cut short by a run that stopped "
                              f"while writing it ({exc}).", stacklevel=2)
                break
            raise DataError(f"{path}, line {number}: not a JSON record ({exc}). Fix or delete "
                            f"that line.") from None
        if not (isinstance(record, dict) and isinstance(record.get(key), int)):
            raise DataError(f"{path}, line {number}: not a record with an integer {key!r}. Fix "
                            f"or delete that line.")
        records.append(record)
    return records

"""Trace report files: ``run.dir/traces/iter_XXXXXXX.jsonl``, one trace record per line.

Written at a loss spike (:func:`write_spike_report`, called by the training loop's spike callback)
with each row's loss, and completed by :func:`add_skipped_batches` when the spike makes the run
skip batches; read back by ``flagscale trace`` to attach those losses to the records it
recomputes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

from flagscale.data.datasets import batch_index
from flagscale.metrics.jsonl import read_records


def report_path(run_dir: Path, iteration: int) -> Path:
    """Where the report of 1-based ``iteration`` lives."""
    return Path(run_dir) / "traces" / f"iter_{iteration:07d}.jsonl"


def write_report(path: Path, records: Iterable[dict]) -> Path:
    """Write ``records`` as JSON lines to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def recorded_losses(run_dir: Path, iteration: int) -> dict[int, float]:
    """``{global_sample: loss}`` from the report of ``iteration``, or {} when there is none.

    A non-finite loss comes back as ``nan``/``inf``. The caller checks the samples match: a report
    written before ``data.skip_iterations`` moved the iteration to another batch names other ones.
    """
    path = report_path(run_dir, iteration)
    if not path.is_file():
        return {}
    losses = {}
    for record in read_records(path, "global_sample"):
        if "loss_nonfinite" in record:
            losses[record["global_sample"]] = float(record["loss_nonfinite"])
        elif record.get("loss") is not None:
            losses[record["global_sample"]] = float(record["loss"])
    return losses


def top_rows(records: list[dict], count: int = 3) -> list[list[dict]]:
    """The ``count`` rows with the highest loss (non-finite first), each as its records."""
    rows: dict[int, list[dict]] = {}
    for record in records:
        rows.setdefault(record["global_sample"], []).append(record)

    def badness(row: list[dict]) -> float:
        first = row[0]
        return math.inf if "loss_nonfinite" in first else (first.get("loss") or -math.inf)

    return sorted(rows.values(), key=badness, reverse=True)[:count]


def write_spike_report(tracer, run_dir: Path, iteration: int,
                       losses: list[float]) -> tuple[Path, str]:
    """Write the trace report of ``iteration``, whose global batch's rows had ``losses`` (in
    global-sample order). Returns its path and a description of its highest-loss rows."""
    first = min(g for *_, g in tracer.rows(iteration))
    records = tracer.records(iteration, {first + i: v for i, v in enumerate(losses)})
    path = write_report(report_path(run_dir, iteration), records)
    return path, "; ".join(_describe_row(row) for row in top_rows(records))


def add_skipped_batches(tracer, run_dir: Path, iteration: int, batches: Iterable[int]) -> Path:
    """Complete the report of ``iteration`` (written by :func:`write_spike_report`) when its spike
    makes the run skip global ``batches`` (0-based, the spiking one among them): it then names
    the documents of every skipped batch. Each record gets ``skipped_batch``, its batch in
    ``data.skip_iterations`` numbering (batch + 1); the records of the batches around the spiking
    one are added, labelled with the iteration that read that batch before the skip, or would
    have read it. ``tracer.skipped`` must still be the skips from before this one. Batches that
    were skipped already are left out."""
    path = report_path(run_dir, iteration)
    spiking_batch = batch_index(tracer.cfg, iteration - 1, tracer.skipped)
    records = []
    for batch in sorted(set(batches)):
        if batch == spiking_batch:
            found = read_records(path, "global_sample")  # with the losses recorded at the spike
        elif (reader := tracer.iteration_of(batch)) is not None:
            found = tracer.records(reader, batch=batch)
        else:
            continue
        records += [{**record, "skipped_batch": batch + 1} for record in found]
    return write_report(path, records)


def _describe_row(row: list[dict]) -> str:
    first = row[0]
    loss = first.get("loss_nonfinite") or f"{first.get('loss'):.4f}"
    where = ", ".join(f"{r['source']}:{r['line']}" if r["source"] else
                      f"{r['dataset']} document {r['document']}" for r in row)
    return f"sample {first['global_sample']} (loss {loss}): {where}"

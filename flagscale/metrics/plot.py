"""Charts of a run's ``metrics.jsonl``: loss, tokens/s/GPU and MFU against iteration (PNG files).

Drawn with matplotlib's Agg renderer through ``Figure`` objects, so no display and no global pyplot
state are involved.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from flagscale.errors import DataError
from flagscale.metrics.jsonl import read_records


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, one per iteration in order.

    A resumed run appends records for iterations it repeats; the last record of an iteration wins.
    A last line cut short by a crash is dropped with a warning (see
    :func:`~flagscale.metrics.jsonl.read_records`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: give the run directory of a run that logged at "
                        f"least one interval (it holds metrics.jsonl).")
    records: dict[int, dict] = {}
    for record in read_records(path, "iteration"):
        records[record["iteration"]] = record
    if not records:
        raise DataError(f"{path} holds no records yet; plot again after the first log interval.")
    return [records[i] for i in sorted(records)]


def _series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key] * scale) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def _save_chart(path: Path, title: str, ylabel: str, xs: list[int], ys: list[float],
                from_zero: bool = False) -> Path:
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    if xs:
        ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, linewidth=1.5)
    else:
        ax.text(0.5, 0.5, "no values logged", ha="center", va="center", transform=ax.transAxes)
    if from_zero and xs:
        # Rates start at zero so a 2% wobble does not look like a collapse.
        ax.set_ylim(bottom=0, top=1.1 * max(ys))
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_metrics(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write ``loss.png``, ``tokens_per_sec_per_gpu.png`` and ``mfu.png`` (``tflops_per_gpu.png``
    when the run's device peak was unknown) under ``RUN_DIR/plots``; returns their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_dir.resolve().name
    paths = [_save_chart(out_dir / "loss.png", f"{name}: training loss", "loss",
                         *_series(records, "loss")),
             _save_chart(out_dir / "tokens_per_sec_per_gpu.png", f"{name}: throughput",
                         "tokens/s per GPU", *_series(records, "tokens_per_sec_per_gpu"),
                         from_zero=True)]
    mfu = _series(records, "mfu", 100.0)
    if mfu[0]:
        paths.append(_save_chart(out_dir / "mfu.png", f"{name}: model FLOPs utilisation",
                                 "MFU (%)", *mfu, from_zero=True))
    else:
        paths.append(_save_chart(out_dir / "tflops_per_gpu.png",
                                 f"{name}: TFLOP/s per GPU (MFU unavailable: device peak unknown)",
                                 "TFLOP/s per GPU", *_series(records, "tflops_per_gpu"),
                                 from_zero=True))
    return paths

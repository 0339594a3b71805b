"""Tracing a run's iterations in one process, without torch.distributed, from its config alone.

    for record in trace_iterations(load_config("runs/x/config.yaml"), 7):
        print(record["source"], record["line"], record["text"])

The train dataset is rebuilt with megatron-core's builder from the same config; its index arrays
are deterministic given seed, split, sequence length and sample count, and are read from the run's
``data_cache`` when it exists, so the records name exactly what the run read. Only the labels
(microbatch, dp_rank, row) depend on the data-parallel size: the samples of an iteration do not.
Batches the run skipped on its own at spikes (``trace.on_spike``: skip or rewind) are read from
its latest checkpoint, which records them, and stepped over as training did.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Iterator, Optional

from flagscale.config import Config, Layout, ParallelDims, load_config, validate
from flagscale.config.history import config_for_iteration
from flagscale.errors import CheckpointError, ConfigError
from flagscale.platform import world_of_one
from flagscale.trace.records import Tracer
from flagscale.trace.reports import recorded_losses


def resolve_dp(cfg: Config, run_dir: Path, dp: Optional[int] = None) -> int:
    """The data-parallel size the run used: ``dp`` if given, else ``parallel.dp``, else the layout
    recorded in the run's latest checkpoint; ConfigError when none of them says."""
    if dp is not None:
        return dp
    if cfg.parallel.dp is not None:
        return cfg.parallel.dp
    from flagscale.checkpoint import CheckpointMeta, latest_checkpoint, read_run_state

    try:
        checkpoint = latest_checkpoint(Path(run_dir) / "checkpoints")
    except CheckpointError:
        checkpoint = None
    if checkpoint is not None:
        return CheckpointMeta.from_common(read_run_state(checkpoint)).layout(checkpoint).dp
    raise ConfigError(f"parallel.dp is not set in the config and {run_dir}/checkpoints has no "
                      f"checkpoint recording the run's layout: the data-parallel size decides "
                      f"which rank and row read each sample. Pass --dp N (or --nproc N, the "
                      f"run's process count).")


def trace_layout(cfg: Config, run_dir: Path, dp: Optional[int] = None) -> Layout:
    """The run's layout, for labelling rows (see :func:`resolve_dp`)."""
    p = cfg.parallel
    dims = ParallelDims(tp=p.tp, pp=p.pp, cp=p.cp, dp=resolve_dp(cfg, run_dir, dp))
    return validate(cfg, dims.world_size, check_paths=False)


def recorded_fingerprints(run_dir: Path) -> Optional[dict]:
    """The fingerprints of the data the run read: its ``data_fingerprint.json``, else its latest
    checkpoint's; None for a run from before fingerprints."""
    from flagscale.checkpoint import CheckpointMeta, latest_checkpoint, read_run_state
    from flagscale.data.fingerprint import read_run_fingerprints

    recorded = read_run_fingerprints(run_dir)
    if recorded is None:
        checkpoint = latest_checkpoint(Path(run_dir) / "checkpoints")
        if checkpoint is not None:
            recorded = CheckpointMeta.from_common(read_run_state(checkpoint)).data_fingerprint
    return recorded


def recorded_skipped_batches(run_dir: Path) -> list[int]:
    """The batches the run skipped on its own at spikes (``data.skip_iterations`` numbering), as
    its latest checkpoint records them; [] without one.

    The latest checkpoint is the record a resume trains on: skips only ever add up, and a skip
    moves only the iterations trained after it, so this list maps every iteration to the batch
    it was finally trained on. A rewind after the latest save is not in it: a resume from that
    checkpoint trains those iterations again without the skip."""
    from flagscale.checkpoint import latest_checkpoint, read_run_state

    try:
        checkpoint = latest_checkpoint(Path(run_dir) / "checkpoints")
    except CheckpointError:
        checkpoint = None
    if checkpoint is None:
        return []
    # Saved there by the training loop's spike callback (flagscale.train.callbacks.spikes).
    callbacks = read_run_state(checkpoint).get("callbacks") or {}
    return [int(b) for b in callbacks.get("SpikeReportCallback", {}).get("skipped_batches", [])]


@contextmanager
def open_tracer(cfg: Config, run_dir: Optional[Path] = None,
                dp: Optional[int] = None) -> Iterator[Tracer]:
    """A :class:`Tracer` over the run's train dataset, built in this process.

    Refuses data that changed since the run read it (DataError naming what changed). Uses the
    run's index cache when it exists, else a temporary cache, so tracing never writes into a run
    directory. Steps over the batches the run skipped at spikes
    (:func:`recorded_skipped_batches`).
    """
    from flagscale.data.datasets import build_datasets, check_training_data
    from flagscale.data.fingerprint import (check_data_unchanged, data_cache_dir,
                                            fingerprint_data)
    from flagscale.data.tokenizer import load_tokenizer

    run_dir = Path(run_dir or cfg.run.dir)
    layout = trace_layout(cfg, run_dir, dp)
    check_training_data(cfg)
    fingerprints = fingerprint_data(cfg)
    check_data_unchanged(recorded_fingerprints(run_dir), fingerprints, f"Tracing {run_dir}",
                         "Rebuild the dataset as the run had it (its samples are read again "
                         "to name them), or trace a run trained on this data.")
    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    # eod only shapes megatron's document masks, which do not touch the index arrays.
    eod = tokenizer.eod if tokenizer else 0
    cache = data_cache_dir(run_dir, fingerprints)
    with tempfile.TemporaryDirectory(prefix="flagscale-trace-") as scratch:
        with world_of_one():
            train, _ = build_datasets(cfg, layout, eod, cache if cache.is_dir() else Path(scratch))
        tracer = Tracer(cfg, layout, train, tokenizer)
        tracer.skipped = recorded_skipped_batches(run_dir)
        yield tracer


def trace_iterations(cfg: Config, first: int, last: Optional[int] = None,
                     run_dir: Optional[str | Path] = None,
                     dp: Optional[int] = None) -> Iterator[dict]:
    """Trace records of 1-based iterations ``first``..``last`` (inclusive; ``last`` defaults to
    ``first``): one per (row, document) of every microbatch of every data-parallel rank.

    ``run_dir`` (default ``run.dir``) supplies the index cache, the layout when ``parallel.dp`` is
    unset, the per-sample losses of trace reports written during training, and the configs a
    resume with other settings replaced (``config.<N>.yaml``): each iteration is traced with the
    config that trained it.
    """
    last = first if last is None else last
    if not 1 <= first <= last <= cfg.train.iterations:
        raise ConfigError(f"Iterations {first}..{last} are outside the run: it has "
                          f"train.iterations={cfg.train.iterations} (1-based), so trace within "
                          f"1..{cfg.train.iterations} with --iteration N [--to M], M >= N.")
    run_dir = Path(run_dir or cfg.run.dir)
    for trained_by, iterations in groupby(range(first, last + 1),
                                          key=lambda i: config_for_iteration(run_dir, i)):
        with open_tracer(load_config(trained_by) if trained_by else cfg, run_dir, dp) as tracer:
            for iteration in iterations:
                losses = recorded_losses(run_dir, iteration)
                samples = {g for *_, g in tracer.rows(iteration)}
                # A report of another batch (written before data.skip_iterations moved this
                # iteration) says nothing about these samples.
                yield from tracer.records(iteration, losses if samples == set(losses) else None)

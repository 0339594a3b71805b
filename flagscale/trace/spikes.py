"""Automatic trace reports: when a step's loss spikes or is not finite, name its documents.

Every step each rank places the per-sample losses it holds (the last pipeline stage's tensor-rank-0
process of each data-parallel replica holds its rows; other ranks hold none) at their positions in
a ``global_batch_size`` vector, and one all-reduce over the world gives every rank every row's
loss. All ranks therefore take the same decision from the same numbers, and no rank can wait in a
collective another one skipped. The writer rank then builds the iteration's trace records from its
own copy of the train dataset (no collective) and writes ``traces/iter_XXXXXXX.jsonl``.

Cost per step: one all-reduce of ``global_batch_size`` float64 values and one host sync to read
them. The loop already syncs every step (the optimizer's gradient norm is read on the host), so
the sync adds only the all-reduce latency; a report costs seconds but only at a spike, at most
``trace.max_reports`` times.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path
from typing import Optional

from flagscale.data.datasets import global_sample_index
from flagscale.errors import ConfigError, FlagScaleError
from flagscale.train.hooks import Hook, StepInfo
from flagscale.trace.records import Tracer
from flagscale.trace.reports import report_path, top_rows, write_report


class SpikeDetector:
    """Flags a loss above ``factor`` x the median of the last ``window`` finite losses (once the
    window is full), and non-finite losses when ``on_nan``."""

    def __init__(self, factor: float, window: int, on_nan: bool):
        self.factor = factor
        self.on_nan = on_nan
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> Optional[str]:
        """Why ``loss`` is reported (a sentence), or None; then remembers it."""
        if not math.isfinite(loss):
            return f"loss is {loss}" if self.on_nan else None
        reason = None
        if len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.factor * median:
                reason = (f"loss {loss:.4f} > {self.factor:g} x median {median:.4f} of the last "
                          f"{len(self.recent)} iterations")
        # The median shrugs off the spike itself, so it joins the window like any loss.
        self.recent.append(loss)
        return reason


class TraceReporter(Hook):
    """Watches per-sample losses every step and writes a trace report at a spike."""

    def __init__(self, cfg, layout, run_dir: Path):
        t = cfg.trace
        self.cfg, self.layout, self.run_dir = cfg, layout, Path(run_dir)
        self.detector = SpikeDetector(t.spike_factor, t.window, t.on_nan)
        self.reports_left = t.max_reports
        self.tracer: Optional[Tracer] = None
        self.positions = None

    def on_train_start(self, state) -> None:
        import torch
        from megatron.core import parallel_state

        from flagscale.data.tokenizer import load_tokenizer

        t = self.cfg.train
        dp_rank = parallel_state.get_data_parallel_rank()
        # This rank's rows in its microbatch order (how the loop concatenates sample_losses),
        # placed where they sit in the global batch: batch 0's global sample indices.
        self.positions = torch.tensor(
            [global_sample_index(0, m, dp_rank, j, t.micro_batch_size, self.layout.dp,
                                 t.global_batch_size)
             for m in range(self.layout.num_microbatches) for j in range(t.micro_batch_size)],
            device=state.platform.device)
        if state.is_writer:
            tokenizer = (load_tokenizer(self.cfg.data.tokenizer) if self.cfg.data.tokenizer
                         else None)
            self.tracer = Tracer(self.cfg, self.layout, state.train_dataset, tokenizer)

    def on_step_end(self, state, step: StepInfo) -> None:
        import torch
        import torch.distributed as dist

        losses = torch.zeros(self.cfg.train.global_batch_size, dtype=torch.float64,
                             device=self.positions.device)
        if step.sample_losses is not None:
            losses[self.positions] = step.sample_losses.to(torch.float64)
        dist.all_reduce(losses)
        values = losses.tolist()
        # Rows hold equal token counts in pretraining, so their mean is the step's loss.
        loss = sum(values) / len(values)
        reason = self.detector.check(loss)
        grad_norm = None if step.grad_norm is None else float(step.grad_norm)
        if reason is None and self.cfg.trace.on_nan and grad_norm is not None \
                and not math.isfinite(grad_norm):
            # A finite loss whose backward overflowed: this batch broke the weights, and the
            # next step's loss is non-finite whatever its data. grad_norm is global, so every
            # rank agrees.
            reason = f"gradient norm is {grad_norm} (loss {loss:.4f})"
        if reason is None or self.reports_left <= 0:
            return
        self.reports_left -= 1
        if not state.is_writer:
            return
        try:
            self._report(step.iteration, values, reason)
        except (OSError, FlagScaleError) as exc:
            # A diagnostic must not end the run (the other ranks would hang in the next
            # collective): say what failed and train on.
            print(f"flagscale trace: iteration {step.iteration}: {reason}, but its trace report "
                  f"could not be written ({exc}). Trace it later with `flagscale trace "
                  f"{self.run_dir / 'config.yaml'} --iteration {step.iteration}`.", flush=True)

    def _report(self, iteration: int, values: list[float], reason: str) -> None:
        from flagscale.checkpoint import latest_checkpoint

        first = min(g for *_, g in self.tracer.rows(iteration))
        records = self.tracer.records(iteration, {first + i: v for i, v in enumerate(values)})
        path = write_report(report_path(self.run_dir, iteration), records)
        worst = "; ".join(_describe_row(row) for row in top_rows(records))
        checkpoint = latest_checkpoint(self.run_dir / "checkpoints")
        skip = ",".join(map(str, sorted({*map(int, self.cfg.data.skip_iterations), iteration})))
        load = f"checkpoint.load={checkpoint}" if checkpoint else "checkpoint.load=null"
        print(f"flagscale trace: iteration {iteration}: {reason}. Trace report: {path}. "
              f"Highest-loss rows: {worst}. To resume past this batch: flagscale train "
              f"{self.run_dir / 'config.yaml'} {load} data.skip_iterations=[{skip}]", flush=True)


def _describe_row(row: list[dict]) -> str:
    first = row[0]
    loss = first.get("loss_nonfinite") or f"{first.get('loss'):.4f}"
    where = ", ".join(f"{r['source']}:{r['line']}" if r["source"] else
                      f"{r['dataset']} document {r['document']}" for r in row)
    return f"sample {first['global_sample']} (loss {loss}): {where}"


def build_trace_hooks(cfg, layout, run_dir: Path) -> list[Hook]:
    """The trace-report hook of a run, or none when ``trace.enabled`` is false."""
    t = cfg.trace
    if not t.enabled:
        return []
    if t.spike_factor <= 0 or t.window < 1 or t.text_chars < 0 or t.max_reports < 0:
        raise ConfigError(f"trace.spike_factor ({t.spike_factor}) must be > 0, trace.window "
                          f"({t.window}) >= 1, trace.text_chars ({t.text_chars}) and "
                          f"trace.max_reports ({t.max_reports}) >= 0.")
    return [TraceReporter(cfg, layout, run_dir)]

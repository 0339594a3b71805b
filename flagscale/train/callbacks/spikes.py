"""Automatic trace reports: when a step's loss spikes or is not finite, name its documents.

Every step each rank places the per-sample (loss sum, tokens) pairs it holds (the last pipeline
stage's tensor-rank-0 processes of each data-parallel replica hold its rows, each rank of a
context-parallel group its share of them; other ranks hold none) at their positions in two
vectors as long as the step's global batch in the step summary
(:mod:`flagscale.train.step_summary`), whose one all-reduce over the world adds the shares up
and gives every rank every row's loss. All ranks therefore take the same decision from the
same numbers (and hold the same spike window, saved in every checkpoint), and no rank can wait
in a collective another one skipped. The writer rank then builds the iteration's trace records
from its own copy of the train dataset (no collective) and writes ``traces/iter_XXXXXXX.jsonl``.

Cost per step: twice (global batch size) float64 values more in the step summary's all-reduce,
no collective or host sync of its own. A report costs seconds but only at a spike, at most
``trace.max_reports`` times per run.
"""

from __future__ import annotations

import math

import torch

from flagscale.checkpoint import latest_checkpoint, read_run_state
from flagscale.data.datasets import batch_index
from flagscale.errors import FlagScaleError
from flagscale.trace import SpikeDetector, Tracer, add_skipped_batches, write_spike_report
from flagscale.train.callbacks.base import Callback, StepInfo


def mean_losses(pairs: list[float]) -> list[float]:
    """Each row's mean token loss from the summed step-summary slot (every row's loss sum, then
    every row's token count)."""
    rows = len(pairs) // 2
    return [total / max(tokens, 1.0) for total, tokens in zip(pairs[:rows], pairs[rows:])]


class SpikeReportCallback(Callback):
    """Watches every step's per-sample losses and writes a trace report at a spike."""

    priority = 300

    def __init__(self, trace_config):
        self.config = trace_config
        self.detector = SpikeDetector(trace_config.spike_factor, trace_config.window,
                                      trace_config.on_nan)
        self.reports_written = 0
        self.rewinds = 0
        self.tracer = None
        self._dp_rank = 0
        self._positions: dict[int, torch.Tensor] = {}
        self.reported = None
        """The iteration whose report this step wrote, for :meth:`_discard` to complete."""

    def pre_train(self) -> None:
        from megatron.core import parallel_state

        from flagscale.data.tokenizer import load_tokenizer

        trainer = self.trainer
        self._dp_rank = parallel_state.get_data_parallel_rank()
        if trainer.is_writer:
            tokenizer = (load_tokenizer(trainer.cfg.data.tokenizer) if trainer.cfg.data.tokenizer
                         else None)
            self.tracer = Tracer(trainer.cfg, trainer.layout, trainer.train_dataset, tokenizer)
            self.tracer.skipped = trainer.skipped_batches

    def _rows(self, batch: int) -> torch.Tensor:
        """This rank's rows of global batch ``batch`` in its microbatch order (how the trainer
        concatenates sample_losses), placed where they sit in that batch; one tensor per batch
        size (a ramp-up has a few)."""
        batches = self.trainer.batches
        size = batches.size(batch)
        if size not in self._positions:
            first = batches.start(batch)
            self._positions[size] = torch.tensor(
                [batches.sample_index(batch, m, self._dp_rank, j) - first
                 for m in range(batches.num_microbatches(batch))
                 for j in range(batches.micro_batch_size)], device=self.trainer.platform.device)
        return self._positions[size]

    def add_to_step_summary(self, step: StepInfo, summary) -> None:
        trainer = self.trainer
        pairs = torch.zeros(2, step.batch_size, dtype=torch.float64,
                            device=trainer.platform.device)
        if step.sample_losses is not None:
            batch = batch_index(trainer.cfg, step.iteration - 1, trainer.skipped_batches)
            pairs[:, self._rows(batch)] = step.sample_losses.to(torch.float64)
        summary.add("sample_losses", pairs)

    def post_step(self, step: StepInfo) -> None:
        values = mean_losses(step.summary["sample_losses"])
        # Rows hold equal token counts in pretraining, so their mean is the step's loss.
        reason = self.detector.check(sum(values) / len(values), step.grad_norm)
        if reason is None:
            return
        if self.reports_written < self.config.max_reports:
            self.reports_written += 1
            if self.tracer is not None:  # the writer rank
                print(self._report(step.iteration, values, reason), flush=True)
        nonfinite = not (math.isfinite(sum(values)) and math.isfinite(step.grad_norm))
        if self.config.on_spike == "rewind" or (self.config.on_spike == "skip" and nonfinite):
            self._discard(step.iteration, reason)

    def _discard(self, iteration: int, reason: str) -> None:
        """Rewind to the newest checkpoint (``rewind``) or retry the iteration (``skip``: the
        optimizer dropped the non-finite update), with the step's batch skipped from now on; then
        stop the step's ``post_step`` (:class:`StepDiscarded`)."""
        import torch.distributed as dist

        trainer, config = self.trainer, self.config
        if self.rewinds >= config.max_rewinds:
            raise SpikeLimitError(
                f"Iteration {iteration}: {reason}, and the run already made trace.max_rewinds="
                f"{config.max_rewinds} {config.on_spike}s (skipped batches "
                f"{trainer.skipped_batches}, data.skip_iterations numbering). The data is not the "
                f"only suspect: check the learning rate and the reports under "
                f"{trainer.run_dir / 'traces'}, or raise trace.max_rewinds.")
        batch = batch_index(trainer.cfg, iteration - 1, trainer.skipped_batches)
        checkpoint = None
        if config.on_spike == "rewind":
            # Rank 0 names the checkpoint for all, so no rank can read a `latest` that another
            # one has not seen yet.
            found = [None, 0]
            if dist.get_rank() == 0:
                found[0] = latest_checkpoint(trainer.run_dir / "checkpoints")
                found[1] = found[0] and int(read_run_state(found[0]).get("iteration", 0))
            dist.broadcast_object_list(found, src=0)
            checkpoint, saved_at = found
            if checkpoint is None:
                raise SpikeLimitError(
                    f"Iteration {iteration}: {reason}, and trace.on_spike=rewind found no "
                    f"complete checkpoint under {trainer.run_dir / 'checkpoints'} to rewind to "
                    f"(the first save is at checkpoint.save_interval="
                    f"{trainer.cfg.checkpoint.save_interval}). Lower the interval, or resume by "
                    f"hand with data.skip_iterations=[{batch + 1}].")
            # Batches around the spike that were read before the checkpoint stay trained on:
            # skipping them now would shift the batches after it instead.
            first = max(batch - config.rewind_skip_around,
                        batch_index(trainer.cfg, saved_at,
                                    trainer.skipped_batches))
            batches = range(first, batch + config.rewind_skip_around + 1)
        else:
            batches = range(batch, batch + 1)
        reported, self.reported = self.reported == iteration, None
        if self.tracer is not None and reported:
            try:
                add_skipped_batches(self.tracer, trainer.run_dir, iteration, batches)
            except (OSError, FlagScaleError) as exc:  # as in _report: the run must go on
                print(f"flagscale trace: iteration {iteration}: its report could not name the "
                      f"skipped batches {[b + 1 for b in batches]} ({exc}).", flush=True)
        rewinds, reports = self.rewinds + 1, self.reports_written
        trainer.rewind_to(checkpoint, [b + 1 for b in batches])
        # The checkpoint's callback state brought back the spike window as it was there; the
        # count of rewinds and reports belongs to the whole run.
        self.rewinds, self.reports_written = rewinds, reports
        if self.tracer is not None:
            self.tracer.skipped = trainer.skipped_batches
            print(f"flagscale trace: iteration {iteration}: {config.on_spike} "
                  f"{self.rewinds}/{config.max_rewinds}: "
                  + (f"reloaded {checkpoint}, " if checkpoint else "")
                  + f"training on from iteration {trainer.iteration + 1} without batches "
                  f"{[b + 1 for b in batches]} (data.skip_iterations numbering).", flush=True)
        raise StepDiscarded(iteration)

    def _report(self, iteration: int, values: list[float], reason: str) -> str:
        """Write the report; return the console message: where it is, the worst rows, and the
        command that resumes past this batch."""
        trainer = self.trainer
        run_dir = trainer.run_dir
        config = run_dir / "config.yaml"
        try:
            path, worst = write_spike_report(self.tracer, run_dir, iteration, values)
        except (OSError, FlagScaleError) as exc:
            # A diagnostic must not end the run (the other ranks would hang in the next
            # collective): say what failed and train on.
            return (f"flagscale trace: iteration {iteration}: {reason}, but its trace report "
                    f"could not be written ({exc}). Trace it later with `flagscale trace "
                    f"{config} --iteration {iteration}`.")
        self.reported = iteration
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        load = f"checkpoint.load={checkpoint}" if checkpoint else "checkpoint.load=null"
        # Entry b + 1 retires batch b (data.skip_iterations numbering), the batch read here.
        batch = batch_index(trainer.cfg, iteration - 1, trainer.skipped_batches)
        skip = sorted({*map(int, trainer.cfg.data.skip_iterations), *trainer.skipped_batches,
                       batch + 1})
        return (f"flagscale trace: iteration {iteration}: {reason}. Trace report: {path}. "
                f"Highest-loss rows: {worst}. To resume past this batch: flagscale train "
                f"{config} {load} data.skip_iterations=[{','.join(map(str, skip))}]")

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "reports_written": self.reports_written,
                "rewinds": self.rewinds, "skipped_batches": list(self.trainer.skipped_batches)}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.reports_written = state["reports_written"]
        self.rewinds = state.get("rewinds", 0)
        self.trainer.skipped_batches = list(state.get("skipped_batches", []))


class StepDiscarded(Exception):
    """Raised by :meth:`SpikeReportCallback.post_step` once it rewound or retried the step: the
    trainer stops the step there, so no later callback saves, evaluates or times weights that
    were thrown away."""


class SpikeLimitError(FlagScaleError):
    """``trace.on_spike`` cannot act on a spike: too many rewinds, or nothing to rewind to."""

"""Automatic trace reports: when a step's loss spikes or is not finite, name its documents.

Every step each rank places the per-sample losses it holds (the last pipeline stage's tensor-rank-0
process of each data-parallel replica holds its rows; other ranks hold none) at their positions in
a ``global_batch_size`` vector, and one all-reduce over the world gives every rank every row's
loss. All ranks therefore take the same decision from the same numbers (and hold the same spike
window, saved in every checkpoint), and no rank can wait in a collective another one skipped. The
writer rank then builds the iteration's trace records from its own copy of the train dataset (no
collective) and writes ``traces/iter_XXXXXXX.jsonl``.

Cost per step: one all-reduce of ``global_batch_size`` float64 values and one host sync to read
them. With gradient clipping (``train.clip_grad`` > 0, the default) megatron-core's optimizer
already reads the gradient norm on the host every step, so the sync adds only the all-reduce
latency. A report costs seconds but only at a spike, at most ``trace.max_reports`` times per run.
"""

from __future__ import annotations

import torch

from flagscale.checkpoint import latest_checkpoint
from flagscale.data.datasets import global_sample_index
from flagscale.errors import FlagScaleError
from flagscale.trace import SpikeDetector, Tracer, write_spike_report
from flagscale.train.callbacks.base import Callback, StepInfo


class SpikeReportCallback(Callback):
    """Watches every step's per-sample losses and writes a trace report at a spike."""

    priority = 300

    def __init__(self, trace_config):
        self.config = trace_config
        self.detector = SpikeDetector(trace_config.spike_factor, trace_config.window,
                                      trace_config.on_nan)
        self.reports_written = 0
        self.tracer = None
        self.positions = None

    def pre_train(self) -> None:
        from megatron.core import parallel_state

        from flagscale.data.tokenizer import load_tokenizer

        trainer = self.trainer
        t, layout = trainer.cfg.train, trainer.layout
        dp_rank = parallel_state.get_data_parallel_rank()
        # This rank's rows in its microbatch order (how the trainer concatenates sample_losses),
        # placed where they sit in the global batch: batch 0's global sample indices.
        self.positions = torch.tensor(
            [global_sample_index(0, m, dp_rank, j, t.micro_batch_size, layout.dp,
                                 t.global_batch_size)
             for m in range(layout.num_microbatches) for j in range(t.micro_batch_size)],
            device=trainer.platform.device)
        if trainer.is_writer:
            tokenizer = (load_tokenizer(trainer.cfg.data.tokenizer) if trainer.cfg.data.tokenizer
                         else None)
            self.tracer = Tracer(trainer.cfg, layout, trainer.train_dataset, tokenizer)

    def post_step(self, step: StepInfo) -> None:
        import torch.distributed as dist

        losses = torch.zeros(self.trainer.cfg.train.global_batch_size, dtype=torch.float64,
                             device=self.positions.device)
        if step.sample_losses is not None:
            losses[self.positions] = step.sample_losses.to(torch.float64)
        dist.all_reduce(losses)
        values = losses.tolist()
        # Rows hold equal token counts in pretraining, so their mean is the step's loss.
        reason = self.detector.check(sum(values) / len(values), step.grad_norm)
        if reason is None or self.reports_written >= self.config.max_reports:
            return
        self.reports_written += 1
        if self.tracer is None:  # not the writer rank
            return
        print(self._report(step.iteration, values, reason), flush=True)

    def _report(self, iteration: int, values: list[float], reason: str) -> str:
        """Write the report; return the console message: where it is, the worst rows, and the
        command that resumes past this batch."""
        run_dir = self.trainer.run_dir
        config = run_dir / "config.yaml"
        try:
            path, worst = write_spike_report(self.tracer, run_dir, iteration, values)
        except (OSError, FlagScaleError) as exc:
            # A diagnostic must not end the run (the other ranks would hang in the next
            # collective): say what failed and train on.
            return (f"flagscale trace: iteration {iteration}: {reason}, but its trace report "
                    f"could not be written ({exc}). Trace it later with `flagscale trace "
                    f"{config} --iteration {iteration}`.")
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        load = f"checkpoint.load={checkpoint}" if checkpoint else "checkpoint.load=null"
        skip = sorted({*map(int, self.trainer.cfg.data.skip_iterations), iteration})
        return (f"flagscale trace: iteration {iteration}: {reason}. Trace report: {path}. "
                f"Highest-loss rows: {worst}. To resume past this batch: flagscale train "
                f"{config} {load} data.skip_iterations=[{','.join(map(str, skip))}]")

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "reports_written": self.reports_written}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.reports_written = state["reports_written"]

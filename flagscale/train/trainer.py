"""The Trainer: set-up in the constructor, the training loop in :meth:`Trainer.fit`, one
optimizer step in :meth:`Trainer.train_step`.

    Trainer(cfg)     stop signals -> platform and process groups -> run directory lock and
                     checks -> model, DDP, optimizer, LR schedule -> callbacks -> resume from a
                     checkpoint -> datasets -> run.dir/config.yaml
    .fit()           for each iteration: pre_step -> train_step (ending with the step
                     summary's one all-reduce) -> post_step -> (when a record is due)
                     pre_log_metrics, log_metrics

Everything parallel is megatron-core's: DDP and the distributed optimizer, the pipeline schedules
(no pipeline, 1F1B, interleaved), tensor and sequence parallelism. Evaluation, checkpointing,
throughput, the loggers and trace reports are :class:`~flagscale.train.callbacks.Callback`
objects, each deciding itself when it acts.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch

from flagscale.checkpoint import (AsyncSaves, CheckpointMeta, latest_checkpoint, load_checkpoint,
                                  read_run_state, resolve_checkpoint, save_checkpoint)
from flagscale.config import Config, config_to_dict, dump_config
from flagscale.config.history import write_run_config
from flagscale.data.datasets import (BatchPrefetcher, BatchSchedule, batch_index, build_datasets,
                                     microbatches)
from flagscale.data.fingerprint import (check_data_unchanged, data_cache_dir, shared_fingerprints,
                                        write_run_fingerprints)
from flagscale.errors import FlagScaleError
from flagscale.platform import setup_platform
from flagscale.platform.lifetime import EXIT_REQUEUE, start_checkpoint_queue_manager
from flagscale.train.callbacks import (Callback, StepInfo, StopOnSignalCallback, StopRequest,
                                       build_callbacks)
from flagscale.train.callbacks.spikes import StepDiscarded
from flagscale.train.callbacks.stop import StoppedBySignal
from flagscale.train.preflight import check_run
from flagscale.train.run_dir import claim_run_dir
from flagscale.train.setup import (build_training, destroy_process_groups, finish_param_sync,
                                   init_batch_calculator, init_model_parallel, init_process_group,
                                   step_scheduler)
from flagscale.train.step_summary import StepSummary


def train(cfg: Config) -> int:
    """Train ``cfg`` in this process, one rank of a torchrun world (or a world of one); returns
    the process's exit status: 0, or :data:`EXIT_REQUEUE` after a stop signal (see
    :mod:`flagscale.train.callbacks.stop`)."""
    try:
        trainer = Trainer(cfg)
    except StoppedBySignal as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"flagscale: {stop}; nothing new to save", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    trainer.fit()
    # A run that ends normally releases its groups itself: NCCL warns about (and can hang on)
    # communicators left to the interpreter's exit.
    destroy_process_groups()
    return EXIT_REQUEUE if trainer.stopped_by_signal else 0


class Trainer:
    """One rank of a training run: its model, optimizer, data, callbacks and progress."""

    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = ()):
        """Set up the run (collective); ``callbacks`` join the ones ``cfg`` asks for."""
        # First, so that a stop signal during set-up ends this process at once, not by default
        # action halfway through a file write.
        stop_request = StopRequest().install()
        self.platform = setup_platform(cfg.platform)
        rank, world_size = init_process_group(self.platform)
        self.layout = check_run(cfg, world_size)
        # The resolved config records the layout this run really has (dp, vpp), not "whatever
        # fits".
        self.cfg = cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, dp=self.layout.dp, vpp=self.layout.vpp))
        self.run_dir = Path(cfg.run.dir)
        # The one place that decides which rank writes the run's files and prints its progress.
        self.is_writer = rank == 0
        # Before any work: one run per directory, and a resume continues the same experiment.
        self._run_dir_lock = claim_run_dir(cfg, self.is_writer)
        if self.is_writer:
            print(f"flagscale: {self.platform.describe()}; {self.layout.describe()}", flush=True)
        # Before this layout's model exists: a conversion builds the source layout's.
        checkpoint = self._checkpoint_to_resume()
        init_model_parallel(cfg, self.layout)

        built = build_training(cfg, self.layout, self.platform)
        self.model, self.optimizer, self.scheduler = built.model, built.optimizer, built.scheduler
        init_batch_calculator(cfg, self.layout, rank)
        self.batches = BatchSchedule.for_training(cfg, self.layout.dp)
        """Size and first sample of every global batch (a ramp-up's too): the data this loop
        reads, the trace names and megatron-core's calculator sizes are the same."""
        if self.is_writer and self.batches.rampup:
            print(f"flagscale: {self.batches.describe_ramp()}", flush=True)
        self._stop = StopOnSignalCallback(stop_request)
        self.callbacks = sorted([*build_callbacks(cfg, self.layout, self.run_dir, self.is_writer),
                                 *callbacks, self._stop], key=lambda c: -c.priority)
        for callback in self.callbacks:
            callback.trainer = self

        self.start_iteration = self.iteration = self.consumed_samples = 0
        self.skipped_batches: list[int] = []
        """Batches skipped at spikes (``trace.on_spike``), besides ``data.skip_iterations``,
        numbered like it; saved with the spike callback's state."""
        self.end_iteration = min(cfg.train.iterations, cfg.train.stop_iteration or
                                 cfg.train.iterations)
        self.data_fingerprints = shared_fingerprints(cfg)
        self.saves = AsyncSaves()
        self._resume(checkpoint)
        if self.is_writer:
            write_run_fingerprints(self.run_dir, self.data_fingerprints)

        eval_passes = (cfg.train.iterations // cfg.train.eval_interval
                       if cfg.train.eval_interval else 0)
        self.train_dataset, self.valid_dataset = build_datasets(
            cfg, self.layout, eod=_eod(cfg),
            cache_dir=data_cache_dir(self.run_dir, self.data_fingerprints),
            valid_samples=eval_passes * cfg.train.eval_iterations * cfg.train.global_batch_size)

        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._forward_backward = get_forward_backward_func()
        self._dp_rank = parallel_state.get_data_parallel_rank()
        self._holds_loss = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                            and parallel_state.get_tensor_model_parallel_rank() == 0)
        self._metrics: dict[str, tuple[str, object]] = {}
        self._log_now = False
        self._init_data_path()
        if self.is_writer:
            # Only now that every check passed and the checkpoint loaded: config.yaml always
            # names what this run trains (the previous one is kept, see write_run_config).
            kept = write_run_config(self.run_dir, dump_config(cfg), self.start_iteration)
            if kept:
                print(f"flagscale: the config changed on this resume; the one that trained "
                      f"iterations up to {self.start_iteration} is kept as {kept}", flush=True)

    @property
    def stopped_by_signal(self) -> bool:
        """The loop ended early on a stop signal, after saving (see
        :mod:`flagscale.train.callbacks.stop`)."""
        return self._stop.stopped

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train from the start (or resumed) iteration to ``end_iteration``. After an exception
        every callback gets ``on_error``; every callback is closed however the loop ends."""
        try:
            self._call("pre_train")
            while self.iteration < self.end_iteration:
                self._call("pre_step", self.iteration + 1)
                step = self.train_step()
                try:
                    self._call("post_step", step)
                except StepDiscarded:
                    continue  # the spike callback rewound or retried it (rewind_to)
                if self._record_due():
                    self._log_metrics()
        except BaseException as exc:
            self._call("on_error", exc)
            raise
        finally:
            self._call("close")
            self._close_data_path()
            # The run is over: the directory is free for the next one (also in this process).
            if self._run_dir_lock is not None:
                self._run_dir_lock.release()

    def train_step(self) -> StepInfo:
        """One optimizer step on the global batch of iteration ``self.iteration + 1``, ending
        with the step summary (:mod:`flagscale.train.step_summary`): the loss and every
        callback's ``add_to_step_summary`` slots summed over the world in one all-reduce."""
        from megatron.core.num_microbatches_calculator import (
            get_current_global_batch_size, get_num_microbatches, update_num_microbatches)

        cfg, device = self.cfg, self.platform.device
        batch = batch_index(cfg, self.iteration, self.skipped_batches)
        # The calculator sizes the step from the samples before its batch in the data (as
        # Megatron-LM counts them, skipped batches included): a resumed or rewound run ramps
        # exactly as the uninterrupted one.
        update_num_microbatches(self.batches.start(batch), consistency_check=True)
        batch_size = get_current_global_batch_size()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        try:
            reduced = self._forward_backward(
                forward_step_func=_forward_step,
                data_iterator=self._train_iterators(batch),
                model=self.model, num_microbatches=get_num_microbatches(),
                seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                forward_only=False)
        except RuntimeError as exc:
            # megatron-core's DDP check (train.check_for_nan_in_grad) raises a RuntimeError that
            # names no iteration of ours, before the gradient reduction: no update happened.
            if "in local grad norm for bucket" in str(exc):
                raise NonFiniteGradientError(self._non_finite_gradient_message(exc)) from exc
            raise
        updated, grad_norm = self._optimizer_step()
        if updated:
            step_scheduler(cfg, self.scheduler, batch_size)
        self.iteration += 1
        self.consumed_samples += batch_size
        if self._gc_interval and self.iteration % self._gc_interval == 0:
            gc.collect()
        step = StepInfo(self.iteration, grad_norm,
                        _sample_losses(reduced) if self._holds_loss else None,
                        batch_size)
        summary = StepSummary(device)
        summary.add("loss", _sum_losses(reduced if self._holds_loss else [], device))
        self._call("add_to_step_summary", step, summary)
        step.summary = summary.reduce()
        self.record_metric("loss", step.summary["loss"], reduce="ratio")
        self.record_metric("lr", lr)
        self.record_metric("grad_norm", grad_norm, reduce="mean")
        self.record_metric("consumed_samples", self.consumed_samples)
        self.record_metric("global_batch_size", batch_size)
        return step

    def _optimizer_step(self) -> tuple[bool, float]:
        """megatron-core's optimizer step, which never applies a non-finite gradient: (updated,
        global gradient norm), the norm nan when the update was dropped for one.

        The optimizer's own public steps in the order its ``step()`` runs them (prepare the
        gradients, global norm, clip, step), with one addition: the global gradient norm,
        which clipping needs anyway (one all-reduce and one host read), also decides whether
        the update is applied. megatron-core itself checks gradients only through a loss scaler,
        an all-reduce and a host read more per step, and not at all in its fp32 optimizer.
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        optimizer, clip = self.optimizer, self.cfg.train.clip_grad
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            return False, float("nan")
        if clip > 0:
            for part in getattr(optimizer, "chained_optimizers", [optimizer]):
                # A stub optimizer (no inner optimizer: e.g. a frozen model part) has nothing to
                # clip.
                params = [] if getattr(part, "is_stub_optimizer", False) else part.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params, clip, grad_norm,
                        part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return optimizer.step_with_ready_grads(), grad_norm

    def _non_finite_gradient_message(self, exc: RuntimeError) -> str:
        iteration = self.iteration + 1
        newest = latest_checkpoint(self.run_dir / "checkpoints")
        kept = (f"the newest checkpoint is {newest}" if newest else
                "there is no checkpoint of this run yet")
        return (f"Iteration {iteration}: a gradient is not finite before the data-parallel "
                f"reduction ({exc}); train.check_for_nan_in_grad stops the run here, before the "
                f"optimizer step, so the weights are those after iteration {iteration - 1} and "
                f"{kept}. See which documents iteration {iteration} reads with `flagscale trace "
                f"{self.run_dir / 'config.yaml'} --iteration {iteration}`, then resume past the "
                f"batch (data.skip_iterations) or with a lower train.lr; or set "
                f"train.check_for_nan_in_grad=false to let trace.on_spike skip it.")

    def rewind_to(self, checkpoint: Optional[Path], skip: Sequence[int]) -> None:
        """Collective: discard this iteration and train on without batches ``skip`` (numbered
        like ``data.skip_iterations``). With a ``checkpoint``, every step after it is discarded
        too: it is reloaded into this process's model, optimizer, schedule and callbacks. Without
        one only the last step is discarded, whose update the optimizer already dropped (a
        non-finite step). First logs a record of this iteration with ``rewind``: {from, to,
        skipped}."""
        skipped = sorted({*self.skipped_batches, *skip})
        to = self.iteration - 1 if checkpoint is None else read_run_state(checkpoint)["iteration"]
        self.record_metric("rewind", {"from": self.iteration, "to": to, "skipped": list(skip)},
                           log_now=True)
        self._log_metrics()
        if checkpoint is None:
            self.consumed_samples -= self.batches.size(
                batch_index(self.cfg, self.iteration - 1, self.skipped_batches))
            self.iteration -= 1
        else:
            loaded = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler,
                                     self.cfg.model, self.layout)
            self.iteration, self.consumed_samples = loaded["iteration"], loaded["consumed_samples"]
            self._load_callback_states(loaded["callbacks"])
        self.skipped_batches = skipped

    # ---- metrics -------------------------------------------------------------------------------

    def record_metric(self, name: str, value, reduce: str = "last", log_now: bool = False) -> None:
        """Add ``value`` to metric ``name`` of the record the next log writes.

        ``reduce`` says how the values recorded since the last record combine:
        ``"last"`` keeps the latest; ``"mean"`` averages those that are not None (None when all
        are); ``"ratio"`` takes a (numerator, denominator) pair of numbers already summed over
        the ranks (a slot of the step summary), sums it over the steps and logs numerator /
        denominator (nan for a zero denominator).

        ``log_now`` makes a record at this iteration even when it is not a log iteration; every
        rank must pass it alike (callbacks act on a record on every rank).
        """
        if reduce not in ("last", "mean", "ratio"):
            raise ValueError(f"record_metric({name!r}): reduce must be 'last', 'mean' or "
                             f"'ratio', not {reduce!r}")
        _, previous = self._metrics.get(name, (reduce, None))
        if reduce == "mean":
            value = [*(previous or []), *([] if value is None else [value])]
        elif reduce == "ratio":
            value = tuple(value) if previous is None else tuple(map(sum, zip(previous, value)))
        self._metrics[name] = (reduce, value)
        self._log_now = self._log_now or log_now

    def _record_due(self) -> bool:
        """A record ends every ``train.log_interval`` iterations, at the last iteration, and where
        a callback asked for one (evaluation: each validation loss is logged at its iteration)."""
        return (self.iteration % self.cfg.train.log_interval == 0
                or self.iteration == self.end_iteration or self._log_now)

    def _log_metrics(self) -> None:
        """Combine the recorded metrics into one record (no collective: the step summaries
        already summed what needs all ranks), let callbacks complete it, then let them write
        it."""
        metrics = {"iteration": self.iteration}
        for name, (reduce, value) in self._metrics.items():
            if reduce == "ratio":
                numerator, denominator = value
                value = numerator / denominator if denominator else float("nan")
            elif reduce == "mean":
                value = sum(value) / len(value) if value else None
            metrics[name] = value
        self._metrics.clear()
        self._log_now = False
        self._call("pre_log_metrics", self.iteration, metrics)
        self._call("log_metrics", self.iteration, metrics)

    # ---- evaluation and checkpoints (for callbacks) --------------------------------------------

    @torch.no_grad()
    def evaluate(self, pass_index: int) -> float:
        """Collective: the global mean loss of validation pass ``pass_index`` (its
        ``train.eval_iterations`` batches, forward only)."""
        import torch.distributed as dist

        cfg, device = self.cfg, self.platform.device
        for chunk in self.model:
            chunk.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(cfg.train.eval_iterations):
            reduced = self._forward_backward(
                forward_step_func=_forward_step,
                data_iterator=self._data_iterators(self.valid_dataset, self._valid_batches,
                                                   pass_index * cfg.train.eval_iterations + i),
                model=self.model, num_microbatches=self.layout.num_microbatches,
                seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                forward_only=True)
            if self._holds_loss:
                totals += _sum_losses(reduced, device)
        for chunk in self.model:
            chunk.train()
        dist.all_reduce(totals)
        loss_sum, tokens = totals.tolist()
        return loss_sum / tokens if tokens else float("nan")

    def save_checkpoint(self, background: bool = False) -> Path:
        """Collective: save the run at this iteration, with every callback's state; returns the
        checkpoint directory, complete on return. With ``background`` the tensors are copied to
        host and written while training goes on: the directory appears (and callbacks get
        ``post_checkpoint_saved``) when :meth:`finish_saves` finds every rank done. A save
        first completes the previous background save, so at most one is in flight."""
        self.finish_saves(blocking=True)
        finish_param_sync(self.model)
        states = {type(c).__name__: state for c in self.callbacks if (state := c.state_dict())}
        # Before megatron-core starts its checkpoint writers' results queue itself: ours dies
        # with this process (see flagscale.platform.lifetime).
        start_checkpoint_queue_manager()
        path = save_checkpoint(self.run_dir / "checkpoints", self.iteration, self.model,
                               self.optimizer, self.scheduler, self.consumed_samples,
                               config_to_dict(self.cfg), self.layout,
                               callbacks=states, data_fingerprint=self.data_fingerprints,
                               background=self.saves if background else None)
        if not background:
            self._call("post_checkpoint_saved", path)
        return path

    def finish_saves(self, blocking: bool) -> None:
        """Collective: complete the background saves every rank has finished writing (all of
        them with ``blocking``)."""
        for path in self.saves.finish(blocking):
            self._call("post_checkpoint_saved", path)

    # ---- set-up helpers ------------------------------------------------------------------------

    def _log_line(self, line: str) -> None:
        """Print ``line`` once for the run (rank 0)."""
        if self.is_writer:
            print(line, flush=True)

    def _checkpoint_to_resume(self) -> Optional[Path]:
        """The checkpoint to load: ``checkpoint.load`` resolved, converted first when its
        optimizer state only reloads at another TP/PP/VPP (collective; no flag needed)."""
        from flagscale.train.reshard import prepare_resume

        checkpoint = _checkpoint_to_load(self.cfg, self.run_dir)
        if checkpoint is None:
            return None
        return prepare_resume(checkpoint, self.cfg, self.layout, self.run_dir, self.platform,
                              self._log_line)

    def _resume(self, checkpoint: Optional[Path]) -> None:
        from flagscale.train.reshard import convert_if_buckets_differ

        if checkpoint is None:
            return
        # This run's own checkpoints (and their layout conversions under checkpoints/resharded).
        if checkpoint.resolve().is_relative_to((self.run_dir / "checkpoints").resolve()):
            check_data_unchanged(
                CheckpointMeta.from_common(read_run_state(checkpoint)).data_fingerprint,
                self.data_fingerprints, f"Resuming from {checkpoint}",
                f"Restore the data this run trained on, or train on the new data as a new run: "
                f"run.dir=NEW_DIR checkpoint.load={checkpoint}.")
        checkpoint = convert_if_buckets_differ(checkpoint, self.model, self.optimizer,
                                               self.layout, self.run_dir, self._log_line)
        loaded = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler,
                                 self.cfg.model, self.layout)
        self.start_iteration = self.iteration = loaded["iteration"]
        self.consumed_samples = loaded["consumed_samples"]
        self._load_callback_states(loaded["callbacks"])
        if self.consumed_samples:  # an import (or any checkpoint at sample 0) read no data yet
            _warn_if_data_order_changed(self.cfg, loaded["config"], checkpoint)
        if self.is_writer:
            what = "resuming at iteration" if loaded["has_optimizer"] else (
                "weights only (no optimizer state in it); starting at iteration")
            print(f"flagscale: loaded {checkpoint}: {what} {self.iteration}", flush=True)
            if loaded["vocab_rows"]:
                from flagscale.train.reshard import vocab_padding_line

                saved, rows = loaded["vocab_rows"]
                print(vocab_padding_line(saved, rows, self.cfg.model.vocab_size), flush=True)

    def _load_callback_states(self, states: dict) -> None:
        # Callback state is keyed by class name: one stateful callback of each class per run.
        for callback in self.callbacks:
            if type(callback).__name__ in states:
                callback.load_state_dict(states[type(callback).__name__])

    def _call(self, method: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, method)(*args)

    # ---- the data path -------------------------------------------------------------------------

    def _init_data_path(self) -> None:
        """On GPUs: the next batch read on a background thread into pinned memory, and Python's
        garbage collection at fixed steps on every rank (an automatic collection pauses one rank
        at a random moment and every collective waits for it). On cpu the data is read on the
        loop's thread, as before, and collection stays automatic unless configured."""
        cuda = self.platform.kind == "cuda"
        interval = self.cfg.train.manual_gc_interval
        self._gc_interval = (100 if cuda else 0) if interval is None else interval
        if self._gc_interval:
            gc.disable()
            gc.collect()
        self._valid_batches = BatchSchedule.for_validation(self.cfg, self.layout.dp)
        self._prefetcher = (BatchPrefetcher(self.train_dataset, self.cfg, self.layout,
                                            self._dp_rank) if cuda else None)

    def _close_data_path(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        if self._gc_interval:
            gc.enable()

    def _train_iterators(self, batch: int):
        """The data iterators of this step, which reads global batch ``batch``; with the
        prefetcher, the batch copied to the device at once and the next step's read started."""
        if self._prefetcher is None:
            return self._data_iterators(self.train_dataset, self.batches, batch)
        device_batch = self._prefetcher.device_microbatches(batch, self.platform.device)
        if self.iteration + 1 < self.end_iteration:
            # A rewind that adds a skip makes this guess wrong; the step then reads its batch.
            self._prefetcher.prefetch(batch_index(self.cfg, self.iteration + 1,
                                                  self.skipped_batches))
        return self._chunk_iterators(lambda: iter(device_batch))

    def _data_iterators(self, dataset, schedule: BatchSchedule, batch: int):
        """One iterator per model chunk over batch ``batch`` of ``schedule``; chunks that neither
        embed nor compute the loss get None."""
        return self._chunk_iterators(lambda: microbatches(
            dataset, self.cfg, self.layout, self._dp_rank, batch, self.platform.device,
            schedule))

    def _chunk_iterators(self, make):
        iters = [make() if (c.module.pre_process or c.module.post_process) else None
                 for c in self.model]
        return iters if len(iters) > 1 else iters[0]


class NonFiniteGradientError(FlagScaleError):
    """A gradient was NaN or infinite with ``train.check_for_nan_in_grad``: the run stops before
    that step's update."""


def _checkpoint_to_load(cfg: Config, run_dir: Path) -> Optional[Path]:
    load = cfg.checkpoint.load
    if not load:
        return None
    if load == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    return resolve_checkpoint(load)


def _warn_if_data_order_changed(cfg: Config, saved: dict, checkpoint: Path) -> None:
    """megatron-core's GPT dataset shuffles over the run's total sample count: a resume that
    changes it (more iterations, other skips, batch or its ramp-up, sequence, seed, data) reads a
    different order from the one the checkpoint's run planned, so samples may repeat or be
    missed."""
    if not saved:
        return
    keys = [("train", k) for k in ("iterations", "global_batch_size", "rampup_batch_size",
                                   "seq_length", "seed")] + \
        [("data", k) for k in ("paths", "split", "skip_iterations")]
    changed = [f"{a}.{b}: {saved.get(a, {}).get(b)!r} -> {getattr(getattr(cfg, a), b)!r}"
               for a, b in keys if a in saved and b in saved[a]
               and saved[a][b] != getattr(getattr(cfg, a), b)]
    if changed:
        warnings.warn(f"Resuming from {checkpoint} with {'; '.join(changed)}: the data order after "
                      f"the resume differs from the one the checkpoint's run would have read "
                      f"(megatron-core shuffles over the total sample count), so some samples may "
                      f"repeat or be skipped.", stacklevel=2)


def _eod(cfg: Config) -> int:
    if not cfg.data.tokenizer:
        return 0  # only used for document masks, which pretraining here does not reset
    from flagscale.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer).eod


# ---- the loss -----------------------------------------------------------------------------------

def _forward_step(data_iterator, model):
    chunk = model.module
    batch = next(data_iterator) if data_iterator is not None else None
    output = model(
        batch["tokens"] if batch and chunk.pre_process else None,
        batch["position_ids"] if batch and chunk.pre_process else None,
        None,
        labels=batch["labels"] if batch and chunk.post_process else None)
    return output, partial(_loss, batch["loss_mask"] if batch else None)


def _loss(loss_mask, per_token_loss):
    """Token-summed loss and token count; megatron-core divides by the global token count."""
    mask = loss_mask.float()
    per_token = per_token_loss.float()
    loss_sum = (per_token * mask).sum()
    tokens = mask.sum()
    # Per sample: (loss sum, tokens), summed over the context-parallel ranks by the step summary.
    per_sample = torch.stack([(per_token * mask).sum(dim=1), mask.sum(dim=1)])
    return loss_sum, tokens.to(torch.int), {
        "loss": torch.stack([loss_sum.detach(), tokens]).double(),
        "sample_losses": per_sample.detach()}


def _sum_losses(reduced: list[dict], device) -> torch.Tensor:
    """(loss sum, token count) over ``reduced``, megatron-core's per-microbatch outputs."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in reduced:
        total += item["loss"]
    return total


def _sample_losses(reduced: list[dict]) -> Optional[torch.Tensor]:
    """This rank's (loss sum, tokens) of each sample in ``reduced``, a 2 x rows tensor in
    microbatch order. Under context parallelism each rank of a CP group holds its share of the
    same rows: the step summary's one all-reduce over the world adds the shares up, so the
    per-sample losses cost no collective of their own."""
    if not reduced:
        return None
    return torch.cat([item["sample_losses"] for item in reduced], dim=1)

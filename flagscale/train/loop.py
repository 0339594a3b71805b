"""The training loop: one function, :func:`train`, read top to bottom.

    set up the platform and process groups -> build model, DDP, optimizer, LR schedule
    -> resume from a checkpoint -> build datasets -> for each iteration: megatron-core's
    forward/backward schedule, optimizer step, hooks (metrics, loggers) -> periodic checkpoints.

Everything parallel is megatron-core's: DDP and the distributed optimizer, the pipeline schedules
(no pipeline, 1F1B, interleaved), tensor and sequence parallelism. Optional behaviours plug in as
:class:`flagscale.train.hooks.Hook` objects.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from flagscale.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from flagscale.config import Config, Layout, config_to_dict, dump_config, validate
from flagscale.data.datasets import (batch_index, build_datasets, check_training_data,
                                     microbatches)
from flagscale.metrics import build_metric_hooks
from flagscale.platform import Platform, setup_platform
from flagscale.trace import build_trace_hooks
from flagscale.train.hooks import Hook, StepInfo
from flagscale.train.setup import build_training, init_model_parallel, init_process_group


@dataclass
class TrainState:
    """What hooks may read about the run."""

    cfg: Config
    layout: Layout
    platform: Platform
    run_dir: Path
    is_writer: bool
    start_iteration: int = 0
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)
    """Logged records of this process, in order (the loss curve, for callers and tests)."""
    train_dataset: object = None
    """The training dataset (megatron-core GPT or blended dataset) the loop reads."""


def train(cfg: Config, hooks: Optional[list[Hook]] = None) -> TrainState:
    """Train ``cfg`` in this process, one rank of a torchrun world (or a world of one)."""
    platform = setup_platform(cfg.platform)
    rank, world_size = init_process_group(platform)
    layout = validate(cfg, world_size)
    # The resolved config records the layout this run really has (dp, vpp), not "whatever fits".
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=layout.dp,
                                                                vpp=layout.vpp))
    check_training_data(cfg)
    init_model_parallel(cfg, layout)
    from megatron.core import parallel_state

    run_dir = Path(cfg.run.dir)
    state = TrainState(cfg, layout, platform, run_dir, is_writer=rank == 0)
    if state.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        print(f"flagscale: {platform.describe()}; {layout.describe()}", flush=True)

    built = build_training(cfg, layout, platform)
    model, optimizer, scheduler = built.model, built.optimizer, built.scheduler

    checkpoint = _checkpoint_to_load(cfg, run_dir)
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint, model, optimizer, scheduler, cfg.model, layout)
        state.start_iteration = state.iteration = loaded["iteration"]
        state.consumed_samples = loaded["consumed_samples"]
        _warn_if_data_order_changed(cfg, loaded["config"], checkpoint)
        if state.is_writer:
            what = "resuming at iteration" if loaded["has_optimizer"] else (
                "weights only (no optimizer state in it); starting at iteration")
            print(f"flagscale: loaded {checkpoint}: {what} {state.iteration}", flush=True)

    eval_passes = (cfg.train.iterations // cfg.train.eval_interval
                   if cfg.train.eval_interval else 0)
    train_ds, valid_ds = build_datasets(
        cfg, layout, eod=_eod(cfg), cache_dir=run_dir / "data_cache",
        valid_samples=eval_passes * cfg.train.eval_iterations * cfg.train.global_batch_size)
    state.train_dataset = train_ds

    hooks = (build_metric_hooks(cfg, layout, run_dir) + build_trace_hooks(cfg, layout, run_dir)
             + list(hooks or []))
    for hook in hooks:
        hook.on_train_start(state)
    forward_backward = _forward_backward_func()
    dp_rank = parallel_state.get_data_parallel_rank()
    holds_loss = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
    interval = torch.zeros(2, dtype=torch.float64, device=platform.device)  # loss sum, tokens
    grad_norms: list[float] = []
    save_every = cfg.checkpoint.save_interval

    end = min(cfg.train.iterations, cfg.train.stop_iteration or cfg.train.iterations)
    for it in range(state.start_iteration, end):
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        lr = optimizer.param_groups[0]["lr"]
        reduced = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=_data_iterators(model, train_ds, cfg, layout, dp_rank,
                                          batch_index(cfg, it), platform.device),
            model=model, num_microbatches=layout.num_microbatches,
            seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            forward_only=False)
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
        if holds_loss:
            interval += _sum_losses(reduced, platform.device)
        state.iteration = it + 1
        state.consumed_samples += cfg.train.global_batch_size
        if grad_norm is not None:
            grad_norms.append(float(grad_norm))
        step = StepInfo(iteration=state.iteration, step_time_s=time.perf_counter() - start,
                        consumed_samples=state.consumed_samples, lr=lr, grad_norm=grad_norm, skipped=not updated,
                        sample_losses=_sample_losses(reduced) if holds_loss else None)
        for hook in hooks:
            hook.on_step_end(state, step)

        last = state.iteration == end
        if state.iteration % cfg.train.log_interval == 0 or last:
            record = _log_record(state, interval, grad_norms, lr)
            if eval_passes and state.iteration % cfg.train.eval_interval == 0:
                record["valid_loss"] = _evaluate(model, valid_ds, cfg, layout, dp_rank,
                                                 state.iteration // cfg.train.eval_interval - 1,
                                                 forward_backward, holds_loss, platform.device)
            interval.zero_()
            grad_norms.clear()
            for hook in hooks:
                hook.on_log(state, record)
            state.history.append(record)

        if save_every and (state.iteration % save_every == 0
                           or (last and cfg.checkpoint.save_final)):
            saved = save_checkpoint(run_dir / "checkpoints", state.iteration, model, optimizer,
                                    scheduler, state.consumed_samples, config_to_dict(cfg),
                                    layout, keep_last=cfg.checkpoint.keep_last)
            for hook in hooks:
                hook.on_save(state, saved)

    for hook in hooks:
        hook.on_train_end(state)
    return state


# ---- set-up -------------------------------------------------------------------------------------

def _checkpoint_to_load(cfg: Config, run_dir: Path) -> Optional[Path]:
    load = cfg.checkpoint.load
    if not load:
        return None
    if load == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    return resolve_checkpoint(load)


def _warn_if_data_order_changed(cfg: Config, saved: dict, checkpoint: Path) -> None:
    """megatron-core's GPT dataset shuffles over the run's total sample count: a resume that
    changes it (more iterations, other skips, batch, sequence, seed, data) reads a different order
    from the one the checkpoint's run planned, so samples may repeat or be missed."""
    if not saved:
        return
    keys = [("train", k) for k in ("iterations", "global_batch_size", "seq_length", "seed")] + \
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


def _forward_backward_func():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


# ---- one step -----------------------------------------------------------------------------------

def _data_iterators(model, dataset, cfg, layout, dp_rank, batch, device):
    """One iterator per model chunk; chunks that neither embed nor compute the loss get None."""
    iters = [microbatches(dataset, cfg, layout, dp_rank, batch, device)
             if (c.module.pre_process or c.module.post_process) else None for c in model]
    return iters if len(iters) > 1 else iters[0]


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
    per_sample = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return loss_sum, tokens.to(torch.int), {
        "loss": torch.stack([loss_sum.detach(), tokens]).double(),
        "sample_losses": per_sample.detach()}


def _sum_losses(reduced: list[dict], device) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in reduced:
        total += item["loss"]
    return total


def _sample_losses(reduced: list[dict]) -> Optional[torch.Tensor]:
    return torch.cat([item["sample_losses"] for item in reduced]) if reduced else None


def _log_record(state: TrainState, interval: torch.Tensor, grad_norms: list[float],
                lr: float) -> dict:
    """The interval's global mean loss: one all-reduce, one host sync per log interval."""
    import torch.distributed as dist

    totals = interval.clone()
    dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    return {"iteration": state.iteration,
            "loss": loss_sum / tokens if tokens else float("nan"),
            "lr": lr,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
            "consumed_samples": state.consumed_samples}


@torch.no_grad()
def _evaluate(model, dataset, cfg, layout, dp_rank, pass_index, forward_backward, holds_loss,
              device) -> float:
    import torch.distributed as dist

    for chunk in model:
        chunk.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(cfg.train.eval_iterations):
        reduced = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=_data_iterators(model, dataset, cfg, layout, dp_rank,
                                          pass_index * cfg.train.eval_iterations + i, device),
            model=model, num_microbatches=layout.num_microbatches,
            seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            forward_only=True)
        if holds_loss:
            totals += _sum_losses(reduced, device)
    for chunk in model:
        chunk.train()
    dist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    return loss_sum / tokens if tokens else float("nan")

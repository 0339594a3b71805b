"""Setting up a training process: process groups, megatron-core's model parallel state, and
the model chunks wrapped in DDP with their distributed optimizer and LR schedule.

The training loop, ``flagscale reshard`` and the benchmarks build exactly the same objects through
these functions, so a checkpoint is always written and read by identically built models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from flagscale.config import Config, Layout
from flagscale.data.datasets import BatchSchedule
from flagscale.models import build_model
from flagscale.platform import Platform


@dataclass
class TrainingObjects:
    """What one rank trains: DDP-wrapped model chunks, the optimizer and the LR schedule."""

    model: list
    """One DDP-wrapped GPTModel chunk per virtual pipeline stage held by this rank."""
    optimizer: object
    """megatron-core (distributed) optimizer over all chunks."""
    scheduler: object
    """megatron-core OptimizerParamScheduler driving lr and weight decay."""


def build_training(cfg: Config, layout: Layout, platform: Platform) -> TrainingObjects:
    """Build, initialise and wrap the model, then its optimizer and schedule (collective)."""
    ddp = ddp_config(cfg, layout, platform)
    model = [_wrap_ddp(chunk, ddp, i)
             for i, chunk in enumerate(build_model(cfg, layout, platform))]
    optimizer = _build_optimizer(cfg, model, ddp)
    configure_schedule(model, optimizer, ddp)
    return TrainingObjects(model, optimizer, _build_scheduler(cfg, optimizer, layout))


def init_process_group(platform: Platform) -> tuple[int, int]:
    """Join (or, without a launcher, create a one-process) torch.distributed world; returns
    (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # A world of one without a launcher (notebooks, single-process tests).
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 20000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend=platform.backend, timeout=timedelta(minutes=30),
                                **({"device_id": platform.device}
                                   if platform.kind == "cuda" else {}))
    return dist.get_rank(), dist.get_world_size()


def destroy_process_groups() -> None:
    """Release megatron-core's parallel groups and the default process group, if set up."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_model_parallel(cfg: Config, layout: Layout) -> None:
    """(Re)initialise megatron-core's parallel state for ``layout`` and seed its RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp)
    model_parallel_cuda_manual_seed(cfg.train.seed)


def ddp_config(cfg: Config, layout: Layout, platform: Platform):
    """megatron-core's ``DistributedDataParallelConfig`` for the run. The overlap settings left
    at ``None`` in the config follow the platform: on for cuda as the Megatron-LM / NeMo recipes
    run dense Llama, off on cpu, where gloo gains nothing from overlap."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p, t = cfg.parallel, cfg.train
    cuda = platform.kind == "cuda"
    overlap_grad = cuda if p.overlap_grad_reduce is None else p.overlap_grad_reduce
    overlap_param = ((cuda and p.distributed_optimizer) if p.overlap_param_gather is None
                     else p.overlap_param_gather)
    align = ((overlap_param and bool(layout.vpp)) if p.align_param_gather is None
             else p.align_param_gather)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.model.params_dtype == "bf16" and p.grad_reduce_dtype == "fp32",
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=overlap_param,
        align_param_gather=align,
        use_distributed_optimizer=p.distributed_optimizer,
        # A NaN or infinite gradient raises before the optimizer step: bf16 has no loss scaler to
        # skip the step, and a NaN grad norm disables clipping, so it would reach the weights.
        check_for_nan_in_grad=t.check_for_nan_in_grad,
        bucket_size=p.ddp_bucket_size,
    )


def _wrap_ddp(chunk, ddp, index: int):
    from megatron.core.distributed import DistributedDataParallel

    # Only the first chunk's buckets are split; later chunks hold one bucket (Megatron's choice).
    return DistributedDataParallel(config=chunk.config, ddp_config=ddp, module=chunk,
                                   disable_bucketing=index > 0)


def optimizer_config(cfg: Config, ddp):
    """megatron-core's ``OptimizerConfig`` for the run (AdamW, clipping, bf16 master weights)."""
    from megatron.core.optimizer import OptimizerConfig

    t, bf16 = cfg.train, cfg.model.params_dtype == "bf16"
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.final_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # No loss scaler: Trainer._optimizer_step drops an update with a non-finite gradient
        # norm itself, without the scaler's extra all-reduce and host read per step.
        overlap_param_gather=ddp.overlap_param_gather)


def _build_optimizer(cfg: Config, model, ddp):
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(optimizer_config(cfg, ddp), model)


def _build_scheduler(cfg: Config, optimizer, layout: Layout):
    """megatron-core's LR and weight-decay schedule. It counts iterations, except under a
    batch-size ramp-up, where it counts samples as Megatron-LM does (:func:`step_scheduler`):
    warmup and decay then last the samples of their iterations' (ramped) batches, so they still
    end at ``warmup_iterations`` and ``lr_decay_iterations``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    decay = t.lr_decay_iterations or t.iterations
    steps = (BatchSchedule.for_training(cfg, layout.dp).start if t.rampup_batch_size
             else (lambda iterations: iterations))
    warmup = steps(t.warmup_iterations)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.final_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(steps(decay), warmup + 1),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=steps(decay), wd_incr_style="constant")


def step_scheduler(cfg: Config, scheduler, batch_size: int) -> None:
    """Advance the LR schedule past one optimizer step of ``batch_size`` samples, in its unit
    (:func:`_build_scheduler`): samples under a ramp-up, else one iteration (what checkpoints
    of runs without a ramp hold)."""
    scheduler.step(increment=batch_size if cfg.train.rampup_batch_size else 1)


def init_batch_calculator(cfg: Config, layout: Layout, rank: int) -> None:
    """(Re)initialise megatron-core's global microbatch calculator for the run; the trainer
    updates it before every step (``update_num_microbatches``) and reads the step's microbatch
    count and global batch size from it."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator)

    t = cfg.train
    # One process may build several trainers (tests, notebooks): start afresh.
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(rank, t.rampup_batch_size, t.global_batch_size,
                                     t.micro_batch_size, layout.dp)


def configure_schedule(model, optimizer, ddp) -> None:
    """Hand megatron-core's pipeline schedules the hooks Megatron-LM's training loop sets
    (``training.py``): loss scaling and gradient finalisation always; with overlapped gradient
    reduction, ``no_sync_func`` (no reduction while microbatches accumulate) and
    ``grad_sync_func`` (each chunk's reduction started as soon as its last backward is done);
    with aligned parameter gathers, ``param_sync_func`` (each chunk's all-gather started by the
    schedule before its first forward)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    def per_chunk(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = config.grad_sync_func = config.param_sync_func = None
    if ddp.overlap_grad_reduce:
        config.no_sync_func = per_chunk([chunk.no_sync for chunk in model])
        config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in model])
    if ddp.overlap_param_gather and ddp.align_param_gather:
        config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in model])


def finish_param_sync(model) -> None:
    """Make every chunk's weights current. With overlapped parameter gathers the optimizer step
    leaves the all-gather of the updated weights to the next forward pass; a checkpoint written
    in between would hold the previous step's weights."""
    for chunk in model:
        if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)

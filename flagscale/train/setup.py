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
    model = [_wrap_ddp(chunk, cfg, platform, i)
             for i, chunk in enumerate(build_model(cfg, layout, platform))]
    optimizer = _build_optimizer(cfg, model)
    _configure_schedule(model, optimizer)
    return TrainingObjects(model, optimizer, _build_scheduler(cfg, optimizer))


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


def _wrap_ddp(chunk, cfg: Config, platform: Platform, index: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.model.params_dtype == "bf16",
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    # Only the first chunk's buckets are split; later chunks hold one bucket (Megatron's choice).
    return DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                   disable_bucketing=index > 0)


def _build_optimizer(cfg: Config, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t, bf16 = cfg.train, cfg.model.params_dtype == "bf16"
    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.final_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        # A constant loss scale of 1 changes no number but turns on the mixed-precision
        # optimizers' check that drops an update with a non-finite gradient (see
        # Trainer._optimizer_step for the fp32 optimizer, which ignores it).
        loss_scale=1.0), model)


def _build_scheduler(cfg: Config, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    decay = t.lr_decay_iterations or t.iterations
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.final_lr,
        lr_warmup_steps=t.warmup_iterations, lr_decay_steps=max(decay, t.warmup_iterations + 1),
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant")


def _configure_schedule(model, optimizer) -> None:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads

"""Plan a checkpoint's rewrite for another TP/PP/DP layout: every check that needs no process
(checkpoint readable, optimizer state present, target layout valid for the model and batch,
output free), and how it is rewritten.

A flagscale training checkpoint (``dp_reshardable`` with its parameter index maps, or
``fully_reshardable``) is rewritten offline in one process
(:mod:`flagscale.convert.offline_reshard`). Bucket-space state without index maps (a
``dp_reshardable`` or ``dp_zero_gather_scatter`` save of another tool) can only be cut into
parameters by the engine that built the same buckets: it is loaded at its own layout on worker
processes and saved ``fully_reshardable``, then loaded at the target layout and saved again
(``stages``, run by :mod:`flagscale.train.reshard`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flagscale.checkpoint.meta import (LOADABLE_SHARDINGS, RESHARDABLE, TRAINING_SHARDING,
                                       CheckpointMeta, optimizer_sharding)
from flagscale.checkpoint.output import check_output_location
from flagscale.checkpoint.paths import resolve_checkpoint
from flagscale.checkpoint.state import check_compatible, read_run_state
from flagscale.config import Config, Layout, ParallelDims, load_config, validate
from flagscale.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ReshardPlan:
    """What :func:`plan_reshard` checked and decided."""

    source: Path
    """The checkpoint directory read (an ``iter_`` directory)."""
    output: Path
    config: Config
    """The checkpoint's config (its model and batch are kept; its layout is replaced)."""
    source_dims: ParallelDims
    target_dims: ParallelDims
    source_sharding: str
    iteration: int
    stages: tuple[ParallelDims, ...]
    """Layouts the engine loads and saves at, in order (each loads the previous one's output);
    empty when the rewrite is offline."""

    @property
    def offline(self) -> bool:
        """Whether the rewrite runs in one process without building the model."""
        return not self.stages


def layout_config(cfg: Config, dims: ParallelDims) -> Config:
    """``cfg`` with its parallel section set to ``dims`` (sequence parallelism kept only where
    TP > 1 allows it)."""
    parallel = dataclasses.replace(cfg.parallel, tp=dims.tp, pp=dims.pp, cp=dims.cp, dp=dims.dp,
                                   vpp=dims.vpp,
                                   sequence_parallel=cfg.parallel.sequence_parallel and
                                   dims.tp > 1)
    return dataclasses.replace(cfg, parallel=parallel)


def check_layout(cfg: Config, dims: ParallelDims, what: str) -> Layout:
    """Validate ``dims`` for the checkpoint's model and batch; ConfigError naming the
    arithmetic otherwise."""
    try:
        return validate(layout_config(cfg, dims), dims.world_size, check_paths=False)
    except ConfigError as exc:
        raise ConfigError(f"{what} layout {dims.describe()} (world {dims.world_size}) does "
                          f"not fit this checkpoint's model and batch: {exc}") from None


def target_dims(source: ParallelDims, tp: Optional[int], pp: Optional[int], dp: Optional[int],
                vpp: Optional[int]) -> ParallelDims:
    """The requested layout: unset TP/PP keep the source's; unset DP keeps the source's world
    size where it divides (else 1); unset VPP keeps the source's while PP is unchanged."""
    for name, value in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    tp = source.tp if tp is None else tp
    pp = source.pp if pp is None else pp
    if vpp is None:
        vpp = source.vpp if pp == source.pp else None
    if dp is None:
        try:
            return ParallelDims.from_world(source.world_size, tp=tp, pp=pp, cp=source.cp, vpp=vpp)
        except ConfigError:
            dp = 1
    return ParallelDims(tp=tp, pp=pp, cp=source.cp, dp=dp, vpp=vpp)


def plan_reshard(input: str | os.PathLike, output: str | os.PathLike, tp: Optional[int] = None,
                 pp: Optional[int] = None, dp: Optional[int] = None,
                 vpp: Optional[int] = None) -> ReshardPlan:
    """Check that ``input`` (a flagscale training checkpoint at any layout and optimizer
    sharding) can be rewritten for the requested layout at ``output``, and list the stages."""
    source, output = resolve_checkpoint(input), Path(output)
    check_output_location(output, (input, source))
    common = read_run_state(source)
    meta = CheckpointMeta.from_common(common)
    if not meta.config:
        raise CheckpointError(f"{source} holds no flagscale config in its common state, so its "
                              f"model and layout are unknown. flagscale reshard handles "
                              f"checkpoints written by flagscale train.")
    if not meta.has_optimizer:
        raise CheckpointError(f"{source} holds model weights only (no optimizer state): torch_dist "
                              f"weights already load at any TP/PP/DP, so there is nothing to "
                              f"reshard. Pass it as checkpoint.load directly.")
    cfg = load_config(base=meta.config)
    src = meta.layout(source)
    sharding = optimizer_sharding(common)
    if sharding not in LOADABLE_SHARDINGS:
        raise CheckpointError(f"{source}: distributed-optimizer sharding '{sharding}' is not one "
                              f"flagscale reshard can load (expected one of "
                              f"{', '.join(LOADABLE_SHARDINGS)}).")
    dst = target_dims(src, tp, pp, dp, vpp)
    offline = sharding == RESHARDABLE or (sharding == TRAINING_SHARDING
                                          and bool(meta.param_index_maps))
    if not offline:
        check_layout(cfg, src, "Source")
    derived = check_layout(cfg, dst, "Target")
    check_compatible(source, common, cfg.model, derived)
    stages = [] if offline else [src] + ([dst] if dst != src else [])
    return ReshardPlan(source, output, cfg, src, dst, sharding, int(common.get("iteration", 0)),
                       tuple(stages))

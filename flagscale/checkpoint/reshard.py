"""Rewrite a training checkpoint for another TP/PP/DP layout, Adam moments and fp32 master
weights included, and make checkpoints whose optimizer state cannot reshard loadable anywhere.

    from flagscale.checkpoint.reshard import reshard
    reshard("runs/a/checkpoints", "ckpt/a_tp2", tp=2)      # then: checkpoint.load=ckpt/a_tp2

Why processes and not an offline rewrite: megatron-core alone knows how a layout's DDP buckets and
distributed-optimizer shards map onto parameters, so each step runs the real engine on local worker
processes (``flagscale.launch.local``; gloo CPU processes on a machine without GPUs), building
model, DDP and optimizer exactly as training does:

1. A checkpoint whose distributed-optimizer state is not ``fully_reshardable`` (megatron-core's
   ``dp_reshardable``: flat bucket-space buffers that only reload at the same TP/PP) is loaded at
   its own layout and saved ``fully_reshardable`` (every optimizer state in its parameter's global
   shape).
2. The ``fully_reshardable`` state is loaded at the target layout and saved again, so the output
   has provably loaded there, and records the target layout in its config.

The output is one checkpoint directory (pass it as ``checkpoint.load``), written beside itself
under a temporary name and renamed when complete; the input is only read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Optional

from flagscale.checkpoint.paths import complete_checkpoints, resolve_checkpoint
from flagscale.checkpoint.state import (check_compatible, load_checkpoint, read_run_state,
                                        save_checkpoint)
from flagscale.config import Config, Layout, config_to_dict, load_config, validate
from flagscale.errors import CheckpointError, ConfigError

RESHARDABLE = "fully_reshardable"
# Sharding types a same-layout load understands (megatron-core 0.16.1 DistributedOptimizer).
LOADABLE_SHARDINGS = ("fully_reshardable", "dp_reshardable", "fully_sharded_model_space",
                      "dp_zero_gather_scatter")
# Bucket-space formats: the flat buffers follow one TP/PP/VPP layout's DDP buckets.
DP_ONLY_SHARDINGS = ("dp_reshardable", "dp_zero_gather_scatter")


@dataclass(frozen=True)
class LayoutSpec:
    """A TP/PP/DP(/VPP) layout, as recorded in a checkpoint's ``flagscale.layout``."""

    tp: int
    pp: int
    dp: int
    vpp: Optional[int] = None

    @property
    def world_size(self) -> int:
        """Processes the layout needs."""
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        """``tp=2 pp=1 dp=1`` (with ``vpp=N`` when interleaved)."""
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return f"tp={self.tp} pp={self.pp} dp={self.dp}{vpp}"


@dataclass
class ReshardResult:
    """What :func:`reshard` wrote."""

    source: Path
    output: Path
    source_layout: LayoutSpec
    target_layout: LayoutSpec
    source_sharding: str
    iteration: int
    model_tensors: int
    optimizer_tensors: int
    seconds: float

    def summary(self) -> str:
        """The one line the CLI prints at the end."""
        return (f"resharded {self.source} (iteration {self.iteration}) -> {self.output}: "
                f"{self.source_layout.describe()} ({self.source_sharding}) -> "
                f"{self.target_layout.describe()} ({RESHARDABLE}); {self.model_tensors} model "
                f"tensors, {self.optimizer_tensors} optimizer state tensors, in "
                f"{self.seconds:.1f}s")


def checkpoint_layout(common: dict, path: Path) -> LayoutSpec:
    """The layout a flagscale checkpoint was saved at (its common state's ``flagscale.layout``)."""
    layout = (common.get("flagscale") or {}).get("layout")
    if not isinstance(layout, dict) or not all(isinstance(layout.get(k), int)
                                               for k in ("tp", "pp", "dp")):
        raise CheckpointError(f"{path} records no flagscale layout (common state 'flagscale."
                              f"layout' is {layout!r}). flagscale reshard handles checkpoints "
                              f"written by flagscale train.")
    return LayoutSpec(layout["tp"], layout["pp"], layout["dp"], layout.get("vpp") or None)


def optimizer_sharding(common: dict) -> str:
    """The distributed-optimizer sharding type a checkpoint was saved with."""
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    return content.get("distrib_optim_sharding_type", RESHARDABLE)


def check_resumable(path: Path, common: dict, layout) -> None:
    """Refuse up front, before any tensor is read, to resume ``path`` at ``layout`` (a Layout or
    LayoutSpec) when its optimizer state only reloads at the TP/PP/VPP it was saved at."""
    meta = common.get("flagscale") or {}
    if not meta.get("has_optimizer", "optimizer" in common) or "layout" not in meta:
        return
    sharding = optimizer_sharding(common)
    saved = checkpoint_layout(common, path)
    if sharding not in DP_ONLY_SHARDINGS or (saved.tp, saved.pp, saved.vpp) == (
            layout.tp, layout.pp, layout.vpp or None):
        return
    raise CheckpointError(
        f"{path} holds '{sharding}' distributed-optimizer state, which megatron-core reloads "
        f"only at the TP/PP it was saved at ({saved.describe()}); this run is tp={layout.tp} "
        f"pp={layout.pp}{f' vpp={layout.vpp}' if layout.vpp else ''}. Convert it once: "
        f"flagscale reshard --input {path} --output NEW_DIR --tp {layout.tp} --pp {layout.pp}, "
        f"then set checkpoint.load=NEW_DIR.")


def layout_config(cfg: Config, layout: LayoutSpec) -> Config:
    """``cfg`` with its parallel section set to ``layout`` (sequence parallelism kept only where
    TP > 1 allows it)."""
    parallel = dataclasses.replace(cfg.parallel, tp=layout.tp, pp=layout.pp, dp=layout.dp,
                                   vpp=layout.vpp,
                                   sequence_parallel=cfg.parallel.sequence_parallel and
                                   layout.tp > 1)
    return dataclasses.replace(cfg, parallel=parallel)


def check_layout(cfg: Config, layout: LayoutSpec, what: str) -> Layout:
    """Validate ``layout`` for the checkpoint's model and batch; ConfigError naming the
    arithmetic otherwise."""
    try:
        return validate(layout_config(cfg, layout), layout.world_size, check_paths=False)
    except ConfigError as exc:
        raise ConfigError(f"{what} layout {layout.describe()} (world {layout.world_size}) does "
                          f"not fit this checkpoint's model and batch: {exc}") from None


def target_layout(source: LayoutSpec, tp: Optional[int], pp: Optional[int], dp: Optional[int],
                  vpp: Optional[int]) -> LayoutSpec:
    """The requested layout: unset TP/PP keep the source's; unset DP keeps the source's world
    size where it divides (else 1); unset VPP keeps the source's while PP is unchanged."""
    tp = source.tp if tp is None else tp
    pp = source.pp if pp is None else pp
    for name, value in (("--tp", tp), ("--pp", pp), ("--dp", dp)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    if dp is None:
        dp = max(source.world_size // (tp * pp), 1) if source.world_size % (tp * pp) == 0 else 1
    if vpp is None:
        vpp = source.vpp if pp == source.pp else None
    return LayoutSpec(tp, pp, dp, vpp if vpp and vpp > 1 else None)


def _check_paths_apart(source: Path, output: Path) -> None:
    src, out = source.resolve(), output.resolve()
    if src == out or out in src.parents or src in out.parents:
        raise CheckpointError(f"--output {output} overlaps --input {source}: the input is never "
                              f"modified. Write the resharded checkpoint to a separate directory.")


def _stages(sharding: str, source: LayoutSpec, target: LayoutSpec, work: Path) -> list[dict]:
    """What to load and save, in order: each stage loads the previous one's output (the first:
    the input) at its layout and saves it fully reshardable under its ``checkpoints``."""
    stages = []
    if sharding != RESHARDABLE:
        stages.append({"layout": dataclasses.asdict(source), "checkpoints": str(work / "source")})
    if not stages or target != source:
        stages.append({"layout": dataclasses.asdict(target), "checkpoints": str(work / "target")})
    return stages


def _run_stages(stages: list[dict], load: Path, work: Path, platform: str,
                log: Callable[[str], None]) -> Path:
    """Run the stages on local worker processes, consecutive stages of one world size in one
    launch (megatron-core's parallel state is rebuilt between them); returns the last saved
    iteration directory."""
    from flagscale.launch.local import run_local

    by_world = groupby(stages, key=lambda stage: LayoutSpec(**stage["layout"]).world_size)
    for index, (world, group) in enumerate(by_world):
        group = list(group)
        layouts = [LayoutSpec(**stage["layout"]) for stage in group]
        log(f"flagscale reshard: {world} worker process(es): "
            f"{'; then '.join(f'load at {lay.describe()}, save {RESHARDABLE}' for lay in layouts)}")
        plan = work / f"plan{index}.json"
        plan.write_text(json.dumps({"platform": platform, "stages": group}))
        code = run_local(world, ["reshard", "--input", str(load), "--output",
                                 str(work), "--worker", str(plan)])
        for stage, layout in zip(group, layouts):
            saved = complete_checkpoints(Path(stage["checkpoints"]))
            if code != 0 or len(saved) != 1:
                raise CheckpointError(f"The resharding worker process(es) at {layout.describe()} "
                                      f"failed (exit code {code}) on {load}; their messages are "
                                      f"above. Nothing was written to --output.")
            load = saved[0]
    return load


def run_plan(load: str | os.PathLike, plan: str | os.PathLike) -> Path:
    """Worker side of :func:`reshard`: run the stages of the JSON ``plan`` on this rank."""
    spec = json.loads(Path(plan).read_text())
    for stage in spec["stages"]:
        load = resave(load, stage["checkpoints"], LayoutSpec(**stage["layout"]),
                      platform=spec["platform"])
    return Path(load)


def _count_tensors(path: Path) -> tuple[int, int]:
    from flagscale.convert.reader import CheckpointReader

    keys = CheckpointReader(path).tensors
    optimizer = sum(1 for key in keys if key.startswith("optimizer."))
    return len(keys) - optimizer, optimizer


def reshard(input: str | os.PathLike, output: str | os.PathLike, tp: Optional[int] = None,
            pp: Optional[int] = None, dp: Optional[int] = None, vpp: Optional[int] = None,
            overwrite: bool = False, platform: Optional[str] = None,
            log: Callable[[str], None] = print) -> ReshardResult:
    """Write ``input`` (a flagscale training checkpoint at any layout and optimizer sharding) to
    ``output`` as a ``fully_reshardable`` checkpoint proven to load at the target layout.

    Every check (checkpoint readable, optimizer state present, target layout valid for the model
    and batch, output free) runs before any process starts. ``platform`` (default: the
    checkpoint config's) is the workers' platform: ``cpu`` runs gloo processes, ``cuda`` needs one
    GPU per process of the larger layout.
    """
    from flagscale.convert.common import atomic_output_dir

    start = time.perf_counter()
    source, output = resolve_checkpoint(input), Path(output)
    _check_paths_apart(source, output)
    common = read_run_state(source)
    raw = (common.get("flagscale") or {}).get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} holds no flagscale config in its common state, so its "
                              f"model and layout are unknown. flagscale reshard handles "
                              f"checkpoints written by flagscale train.")
    if not (common.get("flagscale") or {}).get("has_optimizer", "optimizer" in common):
        raise CheckpointError(f"{source} holds model weights only (no optimizer state): torch_dist "
                              f"weights already load at any TP/PP/DP, so there is nothing to "
                              f"reshard. Pass it as checkpoint.load directly.")
    cfg = load_config(base=raw)
    src_layout = checkpoint_layout(common, source)
    sharding = optimizer_sharding(common)
    if sharding not in LOADABLE_SHARDINGS:
        raise CheckpointError(f"{source}: distributed-optimizer sharding '{sharding}' is not one "
                              f"flagscale reshard can load (expected one of "
                              f"{', '.join(LOADABLE_SHARDINGS)}).")
    dst_layout = target_layout(src_layout, tp, pp, dp, vpp)
    platform = platform or cfg.platform
    if sharding != RESHARDABLE:
        check_layout(cfg, src_layout, "Source")
    derived = check_layout(cfg, dst_layout, "Target")
    check_compatible(source, common, cfg.model, derived)

    with atomic_output_dir(output, overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        if sharding != RESHARDABLE:
            log(f"flagscale reshard: {source} has '{sharding}' optimizer state, which reloads "
                f"only at its own {src_layout.describe()}")
        final = _run_stages(_stages(sharding, src_layout, dst_layout, work), source, work,
                            platform, log)
        for item in final.iterdir():
            os.replace(item, tmp / item.name)
        shutil.rmtree(work)
        model_tensors, optimizer_tensors = _count_tensors(tmp)
    result = ReshardResult(source, output, src_layout, dst_layout, sharding,
                           int(common.get("iteration", 0)), model_tensors, optimizer_tensors,
                           time.perf_counter() - start)
    log(result.summary())
    return result


def resave(source: str | os.PathLike, checkpoints: str | os.PathLike, layout: LayoutSpec,
           sharding: str = RESHARDABLE, platform: Optional[str] = None) -> Path:
    """Collective, one rank of a ``layout.world_size`` world: build model, DDP and distributed
    optimizer at ``layout`` exactly as training does, load ``source`` (with its own optimizer
    sharding), and save it under ``checkpoints`` with ``sharding``. Returns the saved directory.
    """
    from flagscale.platform import setup_platform
    from flagscale.train.setup import build_training, init_model_parallel, init_process_group

    source = Path(source)
    common = read_run_state(source)
    cfg = layout_config(load_config(base=common["flagscale"]["config"]), layout)
    platform = setup_platform(platform or cfg.platform)
    _, world_size = init_process_group(platform)
    derived = validate(cfg, world_size, check_paths=False)
    init_model_parallel(cfg, derived)
    t = build_training(cfg, derived, platform)
    loaded = load_checkpoint(source, t.model, t.optimizer, t.scheduler, cfg.model, derived)
    return save_checkpoint(Path(checkpoints), loaded["iteration"], t.model, t.optimizer,
                           t.scheduler, loaded["consumed_samples"], config_to_dict(cfg), derived,
                           optimizer_sharding=sharding)

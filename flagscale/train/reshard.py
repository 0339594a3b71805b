"""Rewrite a training checkpoint for another TP/PP/DP layout, Adam moments and fp32 master
weights included, into megatron-core's ``fully_reshardable`` format, which loads at any layout.

    from flagscale.train.reshard import reshard
    reshard("runs/a/checkpoints", "ckpt/a_tp2", tp=2)      # then: checkpoint.load=ckpt/a_tp2

A flagscale training checkpoint is rewritten in this one process, tensor by tensor, without
building the model (:mod:`flagscale.convert.offline_reshard`: its saved index maps place every
parameter in the distributed optimizer's flat buffers). Only bucket-space optimizer state that
records no such maps (written by another tool) goes through the engine: megatron-core alone
knows how a layout's DDP buckets map onto parameters, so each stage planned by
:func:`flagscale.checkpoint.reshard.plan_reshard` runs on local worker processes
(:mod:`flagscale.train.reshard_worker` under torchrun; gloo CPU processes on a machine without
GPUs), building model, DDP and optimizer exactly as training does.

The output is one checkpoint directory (pass it as ``checkpoint.load``), written beside itself
under a temporary name and renamed when complete; the input is only read.

Training needs none of this by hand: :func:`prepare_resume` converts a checkpoint whose optimizer
state only reloads at another TP/PP/VPP before the resuming run builds its model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Optional

from flagscale.checkpoint import (complete_checkpoints, load_checkpoint, read_run_state,
                                  save_checkpoint)
from flagscale.checkpoint.meta import (DP_ONLY_SHARDINGS, RESHARDABLE, CheckpointMeta,
                                       needs_conversion, optimizer_sharding)
from flagscale.checkpoint.output import atomic_output_dir
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.checkpoint.reshard import ReshardPlan, layout_config, plan_reshard
from flagscale.checkpoint.state import same_buckets, saved_vocab_rows
from flagscale.config import (Config, Layout, ParallelDims, config_to_dict, load_config,
                              validate)
from flagscale.convert.offline_reshard import reshard_offline
from flagscale.errors import CheckpointError

WORKER_MODULE = "flagscale.train.reshard_worker"


@dataclass
class ReshardResult:
    """What :func:`reshard` wrote."""

    plan: ReshardPlan
    model_tensors: int
    optimizer_tensors: int
    seconds: float

    def summary(self) -> str:
        """The one line the CLI prints at the end."""
        p = self.plan
        return (f"resharded {p.source} (iteration {p.iteration}) -> {p.output}: "
                f"{p.source_dims.describe()} ({p.source_sharding}) -> "
                f"{p.target_dims.describe()} ({RESHARDABLE}); {self.model_tensors} model "
                f"tensors, {self.optimizer_tensors} optimizer state tensors, in "
                f"{self.seconds:.1f}s")


def _run_stages(stages: tuple[ParallelDims, ...], load: Path, work: Path, platform: str,
                log: Callable[[str], None]) -> Path:
    """Run the stages on local worker processes, consecutive stages of one world size in one
    launch (megatron-core's parallel state is rebuilt between them); returns the last saved
    iteration directory."""
    from flagscale.launch.local import run_local

    index = 0
    for world, group in groupby(stages, key=lambda dims: dims.world_size):
        group = [{"layout": dims.to_dict(), "checkpoints": str(work / f"stage{index + i}")}
                 for i, dims in enumerate(group)]
        layouts = [ParallelDims.from_dict(stage["layout"]) for stage in group]
        log(f"flagscale reshard: {world} worker process(es): "
            f"{'; then '.join(f'load at {d.describe()}, save {RESHARDABLE}' for d in layouts)}")
        plan = work / f"plan{index}.json"
        plan.write_text(json.dumps({"platform": platform, "input": str(load), "stages": group}))
        code = run_local(world, [str(plan)], module=WORKER_MODULE)
        for stage, dims in zip(group, layouts):
            saved = complete_checkpoints(Path(stage["checkpoints"]))
            if code != 0 or len(saved) != 1:
                raise CheckpointError(f"The resharding worker process(es) at {dims.describe()} "
                                      f"failed (exit code {code}) on {load}; their messages are "
                                      f"above. Nothing was written to --output.")
            load = saved[0]
        index += len(group)
    return load


def run_plan(plan: str | os.PathLike) -> Path:
    """Worker side of :func:`reshard`: run the stages of the JSON ``plan`` on this rank."""
    spec = json.loads(Path(plan).read_text())
    load = spec["input"]
    for stage in spec["stages"]:
        load = resave(load, stage["checkpoints"], ParallelDims.from_dict(stage["layout"]),
                      platform=spec["platform"])
    return Path(load)


def _count_tensors(path: Path) -> tuple[int, int]:
    keys = CheckpointReader(path).tensors
    optimizer = sum(1 for key in keys if key.startswith("optimizer."))
    return len(keys) - optimizer, optimizer


def reshard(input: str | os.PathLike, output: str | os.PathLike, tp: Optional[int] = None,
            pp: Optional[int] = None, dp: Optional[int] = None, vpp: Optional[int] = None,
            overwrite: bool = False, platform: Optional[str] = None,
            log: Callable[[str], None] = print, progress: bool = True) -> ReshardResult:
    """Write ``input`` (a flagscale training checkpoint at any layout and optimizer sharding) to
    ``output`` as a ``fully_reshardable`` checkpoint for the target layout.

    Every check runs before anything is written (:func:`plan_reshard`, then the offline
    converter's checks of the source). ``progress`` shows a progress bar of the bytes written.
    ``platform`` (default: the checkpoint config's) is the engine workers' platform, used only
    for sources without index maps: ``cpu`` runs gloo processes, ``cuda`` needs one GPU per
    process of the larger layout.
    """
    start = time.perf_counter()
    plan = plan_reshard(input, output, tp, pp, dp, vpp)
    with atomic_output_dir(plan.output, overwrite, command="reshard",
                           inputs=[input, plan.source]) as tmp:
        if plan.offline:
            reshard_offline(plan, tmp, progress=progress)
        else:
            work = tmp / ".work"
            work.mkdir()
            log(f"flagscale reshard: {plan.source} has '{plan.source_sharding}' optimizer state "
                f"without parameter index maps, which reloads only at its own "
                f"{plan.source_dims.describe()}")
            final = _run_stages(plan.stages, plan.source, work,
                                platform or plan.config.platform, log)
            for item in final.iterdir():
                os.replace(item, tmp / item.name)
            shutil.rmtree(work)
        model_tensors, optimizer_tensors = _count_tensors(tmp)
    result = ReshardResult(plan, model_tensors, optimizer_tensors, time.perf_counter() - start)
    log(result.summary())
    return result


def resave(source: str | os.PathLike, checkpoints: str | os.PathLike, dims: ParallelDims,
           sharding: str = RESHARDABLE, platform: Optional[str] = None) -> Path:
    """Collective, one rank of a ``dims.world_size`` world: build model, DDP and distributed
    optimizer at ``dims`` exactly as training does, load ``source`` (with its own optimizer
    sharding), and save it under ``checkpoints`` with ``sharding``. Returns the saved directory.
    """
    from flagscale.platform import setup_platform
    from flagscale.train.setup import init_process_group

    source = Path(source)
    meta = CheckpointMeta.from_common(read_run_state(source))
    cfg = layout_config(load_config(base=meta.config), dims)
    platform = setup_platform(platform or cfg.platform)
    _, world_size = init_process_group(platform)
    derived = validate(cfg, world_size, check_paths=False)
    return _load_and_save(source, Path(checkpoints), cfg, derived, platform, sharding,
                          config_to_dict(cfg))


def _load_and_save(source: Path, checkpoints: Path, cfg: Config, layout: Layout, platform,
                   sharding: str, config: dict) -> Path:
    """Collective: build ``layout``'s model, load ``source``, save it under ``checkpoints`` with
    ``sharding``, recording ``config``."""
    from flagscale.train.setup import build_training, init_model_parallel

    init_model_parallel(cfg, layout)
    t = build_training(cfg, layout, platform)
    loaded = load_checkpoint(source, t.model, t.optimizer, t.scheduler, cfg.model, layout)
    return save_checkpoint(checkpoints, loaded["iteration"], t.model, t.optimizer,
                           t.scheduler, loaded["consumed_samples"], config, layout,
                           optimizer_sharding=sharding, callbacks=loaded["callbacks"])


def converted_dir(checkpoint: Path, run_dir: Path, dims: ParallelDims) -> Path:
    """Where a resume at ``dims`` keeps its conversion of ``checkpoint``:
    ``run.dir/checkpoints/resharded/iter_XXXXXXX.tp2pp1`` (outside ``latest``'s reach)."""
    tag = f"tp{dims.tp}pp{dims.pp}" + (f"vpp{dims.vpp}" if dims.vpp else "")
    return Path(run_dir) / "checkpoints" / "resharded" / f"{checkpoint.name}.{tag}"


_SOURCE_FILE = "resharded_from.txt"


def prepare_resume(checkpoint: Path, cfg: Config, layout: Layout, run_dir: Path, platform,
                   log: Callable[[str], None] = print) -> Path:
    """Collective, before this run builds its model: the checkpoint to load at ``layout``.

    That is ``checkpoint`` itself, unless its optimizer state is bucket-space
    (``dp_reshardable``, training's default) saved at another TP/PP/VPP: then it is converted
    to ``fully_reshardable`` under :func:`converted_dir`, which is returned, and reused by the
    next resume from the same checkpoint. ``log`` gets one line saying so. A flagscale
    checkpoint is converted offline by rank 0 alone (:func:`_convert_offline`); one without
    parameter index maps by the run's own processes through the engine at its saved layout.
    """
    import torch.distributed as dist

    checkpoint = Path(checkpoint)
    common = read_run_state(checkpoint)
    if not needs_conversion(common, layout.dims):
        return checkpoint
    meta = CheckpointMeta.from_common(common)
    src, target = meta.dims, converted_dir(checkpoint, run_dir, layout.dims)
    # Every rank decides on what exists before the barrier below; only then is target written.
    if _converted_earlier(target, checkpoint):
        log(f"flagscale: {checkpoint} was saved at {src.describe()}; loading its conversion "
            f"for {layout.dims.describe()} made earlier, {target}")
        _log_padding(common, target, layout, log)
        return target
    plan = ReshardPlan(checkpoint, target, load_config(base=meta.config), src, layout.dims,
                       optimizer_sharding(common), int(common.get("iteration", 0)), ())
    if meta.param_index_maps:
        log(f"flagscale: {checkpoint} was saved at {src.describe()} with optimizer state that "
            f"reloads only there; converting it for {layout.dims.describe()} into {target} "
            f"offline on rank 0 (reused next time)")
        _convert_offline(plan)
        _log_padding(common, target, layout, log)
        return target
    world = dist.get_world_size()
    model_parallel = src.tp * src.pp * src.cp
    if world % model_parallel:
        raise CheckpointError(
            f"{checkpoint} holds '{optimizer_sharding(common)}' optimizer state saved at "
            f"{src.describe()} without parameter index maps, which converts only on a world "
            f"that tp*pp*cp = {model_parallel} divides; this run has {world} processes. Convert "
            f"it once: flagscale reshard --input {checkpoint} --output NEW_DIR --tp {layout.tp} "
            f"--pp {layout.pp}, then set checkpoint.load=NEW_DIR.")
    log(f"flagscale: {checkpoint} was saved at {src.describe()} with optimizer state that "
        f"reloads only there; converting it for {layout.dims.describe()} into {target} "
        f"(reused next time)")
    stage = ParallelDims(tp=src.tp, pp=src.pp, cp=src.cp, vpp=src.vpp,
                         dp=world // model_parallel)
    saved = layout_config(load_config(base=meta.config), stage)
    # Converting reads no data: one microbatch per DP rank (and no ramp-up) fits any world the
    # layout does.
    stage_cfg = dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, global_batch_size=saved.train.micro_batch_size * stage.dp,
        rampup_batch_size=None))
    stage_layout = validate(stage_cfg, world, check_paths=False)
    work = target.with_name(f".{target.name}.work")
    if dist.get_rank() == 0 and work.exists():
        shutil.rmtree(work)
    dist.barrier()
    done = _load_and_save(checkpoint, work, stage_cfg, stage_layout, platform, RESHARDABLE,
                          meta.config)
    gc.collect()  # the source layout's model and optimizer go before this layout's are built
    if dist.get_rank() == 0:
        _publish(done, target, checkpoint)
        shutil.rmtree(work)
    dist.barrier()
    return target


def vocab_padding_line(saved: int, rows: int, vocab: int) -> str:
    """What a resume says when the checkpoint's vocabulary padding is not this layout's."""
    return (f"flagscale: embedding and output layer padded to {rows} rows here, {saved} in the "
            f"checkpoint (vocab {vocab}): padding rows "
            f"{'trimmed' if rows < saved else 'added as zeros'}")


def _log_padding(common: dict, converted: Path, layout: Layout,
                 log: Callable[[str], None]) -> None:
    # The offline conversion already holds this layout's rows, so the load that follows sees no
    # padding change to report: the change from the checkpoint the user named is said here.
    saved = saved_vocab_rows(common)
    if saved not in (None, layout.padded_vocab_size) and \
            saved_vocab_rows(read_run_state(converted)) == layout.padded_vocab_size:
        log(vocab_padding_line(saved, layout.padded_vocab_size,
                               CheckpointMeta.from_common(common).config["model"]["vocab_size"]))


def _publish(done: Path, target: Path, checkpoint: Path) -> None:
    (done / _SOURCE_FILE).write_text(f"{checkpoint.resolve()}\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(done, target)


_POLL_SECONDS = 1.0


def convert_if_buckets_differ(checkpoint: Path, model_chunks, optimizer, layout: Layout,
                              run_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Collective, once this run's model and optimizer exist: ``checkpoint``, or its offline
    conversion to ``fully_reshardable`` (under :func:`converted_dir`, reused next time) when
    its bucket-space optimizer state was saved in other buckets than this run's (another
    ``parallel.ddp_bucket_size``, parameter dtype or flagscale version): megatron-core reloads
    such state only into the buckets that wrote it."""
    checkpoint = Path(checkpoint)
    common = read_run_state(checkpoint)
    meta = CheckpointMeta.from_common(common)
    if not (meta.has_optimizer and meta.param_index_maps
            and optimizer_sharding(common) in DP_ONLY_SHARDINGS) or \
            same_buckets(meta.param_index_maps, model_chunks, optimizer, layout):
        return checkpoint
    target = converted_dir(checkpoint, run_dir, layout.dims)
    if _converted_earlier(target, checkpoint):
        log(f"flagscale: {checkpoint}'s optimizer state was saved in other buckets than this "
            f"run's; loading its conversion made earlier, {target}")
        return target
    log(f"flagscale: {checkpoint}'s optimizer state was saved in other buckets than this run's "
        f"(another parallel.ddp_bucket_size, parameter dtype or flagscale version), which "
        f"megatron-core cannot reload; converting it into {target} offline on rank 0 (reused "
        f"next time)")
    return _convert_offline(ReshardPlan(checkpoint, target, load_config(base=meta.config),
                                        meta.dims, layout.dims, optimizer_sharding(common),
                                        int(common.get("iteration", 0)), ()))


def _converted_earlier(target: Path, checkpoint: Path) -> bool:
    """Whether ``target`` is a complete conversion of ``checkpoint``."""
    return (target / "metadata.json").is_file() and (target / _SOURCE_FILE).is_file() and (
        (target / _SOURCE_FILE).read_text().strip() == str(checkpoint.resolve()))


def _convert_offline(plan: ReshardPlan) -> Path:
    """Collective: rank 0 converts ``plan`` offline into ``plan.output``; the other ranks wait
    for the result on the file system (a conversion may outlast the process group's
    collective timeout) and raise CheckpointError if rank 0 failed."""
    import torch.distributed as dist

    target = plan.output
    work = target.with_name(f".{target.name}.work")
    failed = target.with_name(f".{target.name}.failed")
    if dist.get_rank() == 0:
        for stale in (work, failed):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    dist.barrier()
    if dist.get_rank() == 0:
        try:
            work.mkdir(parents=True)
            reshard_offline(plan, work)
            _publish(work, target, plan.source)
        except BaseException as exc:
            failed.write_text(f"{type(exc).__name__}: {exc}\n")
            shutil.rmtree(work, ignore_errors=True)
            raise
    else:
        source = str(plan.source.resolve())
        while not ((target / _SOURCE_FILE).is_file()
                   and (target / _SOURCE_FILE).read_text().strip() == source):
            if failed.is_file():
                raise CheckpointError(f"Converting {plan.source} into {target} failed on rank 0: "
                                      f"{failed.read_text().strip()}")
            time.sleep(_POLL_SECONDS)
    dist.barrier()
    return target

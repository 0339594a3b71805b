"""Save and load megatron-core ``torch_dist`` checkpoints of a training run.

A checkpoint holds the model (every tensor a ShardedTensor with its global shape and offset), the
distributed optimizer's state (fp32 master weights and Adam moments), the LR scheduler, per-rank
RNG states, the iteration, the consumed samples and the resolved flagscale config.

Training saves the optimizer state ``dp_reshardable`` (:data:`~flagscale.checkpoint.meta.
TRAINING_SHARDING`): every rank writes its own slice of the flat DDP-bucket buffers, so a save
needs no gather and at most the rank's own shard of extra memory, and replicated tensors (the
model weights on every DP rank) are split over the DP ranks by megatron-core's fully parallel
save strategy. Such a checkpoint reloads at any DP size; at another TP/PP/VPP a resume converts
it first (:func:`flagscale.train.reshard.prepare_resume`). The common state records where every
parameter lies in the buffers (:func:`param_index_map`), for offline tools.

With ``checkpoint.async_save`` (:class:`AsyncSaves`) the tensors are copied to host and written
by a background process; the directory gets its final name and ``latest`` moves only once every
rank's write has finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from flagscale.checkpoint.meta import (RESHARDABLE, TRAINING_SHARDING, CheckpointMeta,
                                       check_resumable)
from flagscale.checkpoint.paths import (LATEST, iteration_dir, latest_checkpoint, partial_dir,
                                        write_latest)
from flagscale.config import padded_vocab_size
from flagscale.errors import CheckpointError
from flagscale.models import architecture_keys
from flagscale.models.gpt import global_param_name
from flagscale.platform import device_rng_state, megatron_quiet, set_device_rng_state


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def model_sharded_state(model_chunks) -> dict:
    """``{"model": ...}`` for one chunk, ``{"model0": ..., "model1": ...}`` with virtual stages."""
    return {key: _unwrap(chunk).sharded_state_dict()
            for key, chunk in zip(model_keys(model_chunks), model_chunks)}


def model_keys(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


RNG_KEYED_BY = "pp,tp,cp,dp"
"""How a checkpoint keys its RNG states (saved in its common state as ``rng_keyed_by``); one
without the entry (flagscale before context parallelism) keyed them by (pp, tp) and kept data-
parallel rank 0's states."""


def _rng_object(dims, keyed_by: str = RNG_KEYED_BY):
    """This rank's RNG states (CPU, device, megatron-core's tracker) as a sharded object keyed by
    its (pp, tp, cp, dp) rank, so a resume at the same layout gives every rank back exactly its
    own: the tracker's model-parallel stream is seeded per tensor-parallel rank, and nothing keeps
    the generators of context- or data-parallel ranks equal. ``keyed_by="pp,tp"`` addresses a
    checkpoint of an earlier flagscale (one state per (pp, tp), data-parallel rank 0's)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    device_state = device_rng_state()
    if device_state is not None:
        state["cuda"] = device_state
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    if keyed_by == "pp,tp":
        return ShardedObject("rng_state", state, (dims.pp, dims.tp), (pp_rank, tp_rank),
                             replica_id=dp_rank)
    return ShardedObject("rng_state", state, (dims.pp, dims.tp, dims.cp, dims.dp),
                         (pp_rank, tp_rank, parallel_state.get_context_parallel_rank(), dp_rank),
                         replica_id=0)


def param_index_map(model_chunks, optimizer, layout, model_state: dict) -> list[dict]:
    """Collective: where each parameter lies in the distributed optimizer's flat buffers, for
    every (tp, pp) rank, sorted by (pp_rank, tp_rank).

    Each entry is ``{"tp_rank", "pp_rank", "buckets": [...]}``; each bucket ``{"key",
    "vpp_stage", "numel", "params": [{"name", "key", "layer", "shape", "tp_axis", "start",
    "end"}]}`` where the bucket's ``key`` prefixes its ``.param``/``.exp_avg``/``.exp_avg_sq``
    tensors of a ``dp_reshardable`` save (each ``numel`` long); per parameter, ``name`` is its
    layout-free module name (global layer number), ``key`` the checkpoint tensor holding its
    weights (layer-stacked: ``layer`` indexes the leading axis, None for the rest), ``shape``
    its global shape, ``tp_axis`` the axis TP splits (None when replicated; a shard of fc1 holds
    [gate; up] halves) and ``[start, end)`` its range in the bucket. ``model_state`` is the
    model's sharded state dict (:func:`model_sharded_state`), which names the keys. Only these
    small maps travel (DP rank 0 of each (tp, pp) rank sends its own), never the state.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    import torch.distributed as dist
    from megatron.core import parallel_state

    local = None
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        local = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                 "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                 "buckets": _bucket_maps(model_chunks, optimizer, layout.tp,
                                         {id(sh.data): sh.key for sh in nested_values(model_state)
                                          if hasattr(sh, "key")})}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return sorted((g for g in gathered if g is not None),
                  key=lambda g: (g["pp_rank"], g["tp_rank"]))


def same_buckets(saved_maps: list[dict], model_chunks, optimizer, layout) -> bool:
    """Collective: whether this run's distributed optimizer holds the same parameters in the
    same buckets, in the same order, as the save that wrote ``saved_maps`` (its
    :func:`param_index_map`). Bucket-space (``dp_reshardable``) optimizer state reloads only
    then; bucket padding, which follows the DP size, does not matter."""
    current = param_index_map(model_chunks, optimizer, layout, model_sharded_state(model_chunks))

    def shape(maps):
        return [(m["tp_rank"], m["pp_rank"],
                 [(b["key"], b["vpp_stage"], [p["name"] for p in b["params"]])
                  for b in m["buckets"]]) for m in maps]

    return shape(current) == shape(saved_maps)


def _bucket_maps(model_chunks, optimizer, tp: int, keys: dict[int, str]) -> list[dict]:
    buckets = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for gbuf_idx, buffer in enumerate(getattr(inner, "buffers", [])):
            stage, chunk = next((i, _unwrap(c)) for i, c in enumerate(model_chunks)
                                if any(b is buffer for b in [*c.buffers,
                                                             *c.expert_parallel_buffers]))
            names = {param: global_param_name(chunk, name)
                     for name, param in chunk.named_parameters()}
            # The key megatron-core's sharded_param_state_dp_reshardable gives this bucket.
            prefix = (f"optimizer.distributed.dp_group_idx_{inner.data_parallel_group_idx}"
                      f".gbuf_idx_{gbuf_idx}.dtype_{(buffer.param_dtype, buffer.grad_dtype)}")
            for bucket_idx, bucket in enumerate(buffer.buckets):
                params = sorted(((start, end, param) for param, (start, end, b)
                                 in buffer.param_index_map.items() if b == bucket_idx),
                                key=lambda item: item[0])
                buckets.append({"key": f"{prefix}.bucket_idx_{bucket_idx}", "vpp_stage": stage,
                                "numel": bucket.numel_unpadded,
                                "params": [_param_entry(names[param], keys[id(param)], param, tp,
                                                        start - bucket.offset, end - bucket.offset)
                                           for start, end, param in params]})
    return buckets


def _param_entry(name: str, key: str, param, tp: int, start: int, end: int) -> dict:
    shape = list(param.shape)
    axis = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if axis is not None:
        shape[axis] *= tp
    parts = name.split(".")
    layer = int(parts[2]) if parts[:2] == ["decoder", "layers"] else None
    return {"name": name, "key": key, "layer": layer, "shape": shape, "tp_axis": axis,
            "start": start, "end": end}


class AsyncSaves:
    """Checkpoints being written in the background (``checkpoint.async_save``), through
    megatron-core's AsyncCallsQueue: each save's tensors are staged to host memory when it is
    scheduled and written by a forked process, so training goes on meanwhile.

    :meth:`finish` is collective (one small all-reduce per pending save) and returns the
    checkpoints it completed: renamed to their final names, ``latest`` pointing at the newest.
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue()
        self._paths: dict[int, Path] = {}

    @property
    def pending(self) -> int:
        """Saves scheduled and not yet finished (the same on every rank)."""
        return self._queue.get_num_unfinalized_calls()

    def schedule(self, request, final: Path) -> None:
        self._paths[self._queue.schedule_async_request(request)] = final

    def finish(self, blocking: bool) -> list[Path]:
        """Complete the saves every rank has finished writing (with ``blocking``, wait for all
        of them); returns their directories."""
        if not self.pending:
            return []
        with megatron_quiet():
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        return [self._paths.pop(index) for index in done]

    def abandon(self) -> None:
        """Stop background writes without completing them (after an error on some rank, when
        the collective completion could hang); their ``.partial`` directories stay unnamed."""
        self._queue.close(abort=True)
        self._paths.clear()


def save_checkpoint(checkpoints: Path, iteration: int, model_chunks, optimizer, scheduler,
                    consumed_samples: int, config: dict, layout,
                    optimizer_sharding: str = TRAINING_SHARDING,
                    callbacks: Optional[dict] = None,
                    data_fingerprint: Optional[dict] = None,
                    background: Optional[AsyncSaves] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory; without ``background`` it
    is complete on return, with it the write goes on in the background and the directory
    appears once ``background.finish`` completes it.

    ``callbacks`` is the training loop's callback state (picklable, rank 0's copy is saved);
    :func:`load_checkpoint` returns it. ``data_fingerprint`` (the run's datasets, see
    :mod:`flagscale.data.fingerprint`) is recorded in :class:`CheckpointMeta`.

    A full disk (ENOSPC, EDQUOT) anywhere in the save raises CheckpointError "disk full" and
    removes the partial directory (see :func:`_reporting_disk_full`); ``latest`` keeps naming
    the previous checkpoint.

    ``optimizer_sharding`` is megatron-core's distributed-optimizer sharding type: the default
    ``dp_reshardable`` writes each rank's own shard (reloads at any DP; converted before a load
    at another TP/PP/VPP), ``fully_reshardable`` gathers each (tp, pp) rank's state to save it
    in parameter shapes (reloads anywhere as is).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)

    checkpoints = Path(checkpoints)
    rank = dist.get_rank()
    partial, final = partial_dir(checkpoints, iteration), iteration_dir(checkpoints, iteration)
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    sharded = model_sharded_state(model_chunks)
    sharding = {"distrib_optim_sharding_type": optimizer_sharding}
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False,
                                                        metadata=sharding)
    sharded["rng_state"] = _rng_object(layout.dims)
    sharded["rng_keyed_by"] = RNG_KEYED_BY
    sharded["iteration"] = iteration
    sharded["consumed_samples"] = consumed_samples
    sharded["scheduler"] = scheduler.state_dict()
    sharded["callbacks"] = callbacks or {}
    index_maps = (param_index_map(model_chunks, optimizer, layout,
                                  {key: sharded[key] for key in model_keys(model_chunks)})
                  if optimizer_sharding == TRAINING_SHARDING else None)
    sharded["flagscale"] = CheckpointMeta(config, layout.dims, has_optimizer=True,
                                          data_fingerprint=data_fingerprint or {},
                                          param_index_maps=index_maps).to_dict()
    # Replicated tensors (weights on every DP rank) are written once, spread over the DP ranks.
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        parallel_state.get_data_parallel_group(with_context_parallel=True))
    with _reporting_disk_full(checkpoints, partial, coordinator=rank == 0):
        with megatron_quiet():
            request = dist_checkpointing.save(sharded, str(partial), sharded_strategy=strategy,
                                              content_metadata=sharding,
                                              async_sharded_save=background is not None)
    publish = _publisher(checkpoints, partial, final, config)
    if background is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        background.schedule(request, final)
    return final


def _publisher(checkpoints: Path, partial: Path, final: Path,
               config: dict) -> Callable[[], None]:
    """The collective last step of a save, run once every rank's tensors are written: rank 0
    renames the directory to its final name and moves ``latest``."""
    def publish() -> None:
        import torch.distributed as dist

        rank = dist.get_rank()
        with _reporting_disk_full(checkpoints, partial, coordinator=rank == 0):
            dist.barrier()
            if rank == 0:
                config_yaml = yaml.safe_dump(config, sort_keys=False)
                (partial / "flagscale_config.yaml").write_text(config_yaml)
        if rank == 0:
            if final.exists():
                # Re-saving an iteration (a rerun past it): the new copy is complete, swap it in.
                stale = final.with_name(final.name + ".old")
                if stale.exists():  # left by a save killed inside this swap
                    shutil.rmtree(stale)
                os.replace(final, stale)
                os.replace(partial, final)
                shutil.rmtree(stale)
            else:
                os.replace(partial, final)
            write_latest(checkpoints, final)
        dist.barrier()
    return publish


# ---- a full disk during a save -------------------------------------------------------------------

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads once megatron-core's writer processes and torch's zip writer have wrapped
# the OSError into text: "Worker failure: [Errno 28] No space left on device", and from
# torch.save's PyTorchStreamWriter "[enforce fail at inline_container.cc:672] . unexpected pos".
_DISK_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "unexpected pos")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or anything it wraps (causes, contexts, torch's per-rank
    ``CheckpointException.failures``) is an ENOSPC or EDQUOT."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            # torch keeps (exception, traceback summary) pairs per rank
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def _reporting_disk_full(checkpoints: Path, partial: Path, coordinator: bool):
    """Turn a full disk inside the block into CheckpointError "disk full" naming the space
    needed (the previous checkpoint's size, else what was written so far) and the space free,
    after removing ``partial`` on the ``coordinator`` rank (megatron-core raises on every rank
    only once all of them are past the collective write, so nothing writes into it any more).

    Only megatron-core's coordinator (rank 0) learns why a write failed; the other ranks get an
    empty ``CheckpointException`` and say where the reason is."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if not is_disk_full(exc):
            if isinstance(exc, CheckpointException) and not exc.failures:
                raise CheckpointError(f"Saving {partial} failed on another rank; rank 0's "
                                      f"message says why.") from exc
            raise
        written = 0
        if coordinator and partial.exists():
            written = _size(partial)
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(checkpoints)
        need = (f"the previous checkpoint {previous.name} takes {_gib(_size(previous))}"
                if previous else f"at least {_gib(written)} (written before it failed)")
        keep = f"; {LATEST} still names {previous.name}" if previous else ""
        raise CheckpointError(
            f"Disk full while saving {partial}: {need}, and {checkpoints} has "
            f"{_gib(shutil.disk_usage(checkpoints).free)} free. The partial save was "
            f"removed{keep}. Free space there (or set checkpoint.keep_last), then resume with "
            f"checkpoint.load=auto.") from exc


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def read_run_state(path: Path) -> dict:
    """The non-tensor part of a checkpoint (iteration, config, layout...), read on one process."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # a missing or foreign common.pt surfaces in many types
        raise CheckpointError(f"{path}: cannot read the checkpoint's common state ({exc}). Is it "
                              f"a megatron-core torch_dist checkpoint?") from None


def check_compatible(path: Path, common: dict, model_config, layout) -> None:
    """Refuse, before any tensor is read, a checkpoint of another architecture.

    A vocabulary padded to another size (TP changes the padding: Megatron pads to a multiple of
    ``make_vocab_size_divisible_by * tp``) is not refused: megatron-core loads embedding and
    output rows with ``allow_shape_mismatch``, so rows past the saved padding come in as zeros
    and saved padding rows past this layout's are dropped, for the weights and (saved
    ``fully_reshardable``) for the master weights and Adam moments alike; every real row is
    kept."""
    saved_config = CheckpointMeta.from_common(common).config
    saved = saved_config.get("model", {})
    diffs = [f"model.{k}: checkpoint {saved.get(k)}, this run {getattr(model_config, k)}"
             for k in architecture_keys(model_config)
             if k in saved and saved.get(k) != getattr(model_config, k)
             and not (k == "num_query_groups" and (saved.get(k) or saved.get("num_attention_heads"))
                      == (model_config.num_query_groups or model_config.num_attention_heads))]
    if diffs:
        raise CheckpointError(f"{path} holds a different architecture: {'; '.join(diffs)}. Load it "
                              f"with the model config it was trained with (its "
                              f"flagscale_config.yaml).")


def saved_vocab_rows(common: dict) -> Optional[int]:
    """Embedding rows a checkpoint stores (its vocabulary padded at its TP), when known."""
    saved_config = CheckpointMeta.from_common(common).config
    saved, tp = saved_config.get("model", {}), saved_config.get("parallel", {}).get("tp")
    if not tp or "vocab_size" not in saved:
        return None
    return padded_vocab_size(saved["vocab_size"], saved.get("make_vocab_size_divisible_by", 128),
                             tp)


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler, model_config,
                    layout) -> dict:
    """Collective: load ``path`` into this rank's model chunks, optimizer and scheduler.

    Returns ``{"iteration", "consumed_samples", "has_optimizer", "config", "callbacks",
    "vocab_rows"}`` (the saved run's resolved config and its callback state, {} when it has
    none; ``vocab_rows`` is (saved, loaded) embedding rows when the padding changed, else None).
    A model-only checkpoint (e.g. imported from Hugging Face) loads the weights and leaves
    optimizer and schedule fresh. Each tensor is read once per DP group (megatron-core's fully
    parallel load) and sent to the other DP ranks.
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper)

    common = read_run_state(path)
    check_compatible(path, common, model_config, layout)
    check_resumable(path, common, layout.dims)
    meta = CheckpointMeta.from_common(common)
    has_optimizer = meta.has_optimizer
    sharded = model_sharded_state(model_chunks)
    if has_optimizer:
        _materialize_optimizer_state(optimizer)
        content = (dist_checkpointing.load_content_metadata(str(path))
                   or {"distrib_optim_sharding_type": RESHARDABLE})
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                            metadata=content)
    if meta.dims == layout.dims and has_optimizer and _holds_rng_states(path):
        sharded["rng_state"] = _rng_object(layout.dims, common.get("rng_keyed_by", "pp,tp"))
    strategy = FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(path)),
        parallel_state.get_data_parallel_group(with_context_parallel=True))
    with megatron_quiet():
        state = dist_checkpointing.load(sharded, str(path), sharded_strategy=strategy)
    for key, chunk in zip(model_keys(model_chunks), model_chunks):
        _unwrap(chunk).load_state_dict(state[key], strict=False)
    if has_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in common:  # Megatron-LM's own (in samples) is converted by its importer
            # megatron-core's load_state_dict steps the scheduler *by* the saved count: from a
            # scheduler that has already stepped (a rewind in the same process) the LR would
            # land past the checkpoint's.
            scheduler.num_steps = 0
            scheduler.load_state_dict(common["scheduler"])
    else:
        optimizer.reload_model_params()
    if "rng_state" in state:
        _restore_rng(state["rng_state"])
    return {"iteration": int(common.get("iteration", 0)) if has_optimizer else 0,
            "consumed_samples": int(common.get("consumed_samples", 0)) if has_optimizer else 0,
            "has_optimizer": has_optimizer, "config": meta.config,
            "callbacks": common.get("callbacks") or {},
            "vocab_rows": (rows, layout.padded_vocab_size)
            if (rows := saved_vocab_rows(common)) not in (None, layout.padded_vocab_size)
            else None}


def _holds_rng_states(path: Path) -> bool:
    # flagscale reshard leaves them out at a new TP/PP, where no rank of the layout owned them.
    from torch.distributed.checkpoint import FileSystemReader

    return any(key.startswith("rng_state/")
               for key in FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _materialize_optimizer_state(optimizer) -> None:
    # A fresh distributed optimizer has no Adam state yet, and building its sharded state dict
    # for loading reads that state (the 'step' of every parameter).
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values"):
            inner._init_optimizer_states_with_dummy_values()


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    set_device_rng_state(state.get("cuda"))
    get_cuda_rng_tracker().set_states(state["tracker"])

"""Save and load megatron-core ``torch_dist`` checkpoints of a training run.

A checkpoint holds the model (every tensor a ShardedTensor with its global shape and offset), the
distributed optimizer's state saved ``fully_reshardable`` (fp32 master weights and Adam moments in
the shape of their parameters), the LR scheduler, per-rank RNG states, the iteration, the consumed
samples and the resolved flagscale config. Because every tensor is stored globally, a checkpoint
loads at any TP/PP/VPP/DP layout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from flagscale.checkpoint.meta import RESHARDABLE, CheckpointMeta, check_resumable
from flagscale.checkpoint.paths import (LATEST, iteration_dir, latest_checkpoint, partial_dir,
                                        write_latest)
from flagscale.config import padded_vocab_size
from flagscale.errors import CheckpointError
from flagscale.models import architecture_keys
from flagscale.platform import device_rng_state, megatron_quiet, set_device_rng_state


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def model_sharded_state(model_chunks) -> dict:
    """``{"model": ...}`` for one chunk, ``{"model0": ..., "model1": ...}`` with virtual stages."""
    return {key: _unwrap(chunk).sharded_state_dict()
            for key, chunk in zip(model_keys(model_chunks), model_chunks)}


def model_keys(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _rng_object(layout):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    device_state = device_rng_state()
    if device_state is not None:
        state["cuda"] = device_state
    return ShardedObject("rng_state", state, (layout.pp, layout.tp),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank()),
                         replica_id=parallel_state.get_data_parallel_rank())


def save_checkpoint(checkpoints: Path, iteration: int, model_chunks, optimizer, scheduler,
                    consumed_samples: int, config: dict, layout,
                    optimizer_sharding: str = RESHARDABLE,
                    callbacks: Optional[dict] = None,
                    data_fingerprint: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory once it is complete.

    ``callbacks`` is the training loop's callback state (picklable, rank 0's copy is saved);
    :func:`load_checkpoint` returns it. ``data_fingerprint`` (the run's datasets, see
    :mod:`flagscale.data.fingerprint`) is recorded in :class:`CheckpointMeta`.

    A full disk (ENOSPC, EDQUOT) anywhere in the save raises CheckpointError "disk full" and
    removes the partial directory (see :func:`_reporting_disk_full`); ``latest`` keeps naming
    the previous checkpoint.

    ``optimizer_sharding`` is megatron-core's distributed-optimizer sharding type; anything but
    the default ``fully_reshardable`` (e.g. ``dp_reshardable``) only reloads at the same TP/PP.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

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
    sharded["rng_state"] = _rng_object(layout)
    sharded["iteration"] = iteration
    sharded["consumed_samples"] = consumed_samples
    sharded["scheduler"] = scheduler.state_dict()
    sharded["callbacks"] = callbacks or {}
    sharded["flagscale"] = CheckpointMeta(config, layout.dims, has_optimizer=True,
                                          data_fingerprint=data_fingerprint or {}).to_dict()
    with _reporting_disk_full(checkpoints, partial, coordinator=rank == 0):
        with megatron_quiet():
            dist_checkpointing.save(sharded, str(partial), content_metadata=sharding)
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
    return final


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
    """Refuse, before any tensor is read, a checkpoint of another architecture or whose
    embedding is padded to another size than this layout's."""
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
    saved_tp = saved_config.get("parallel", {}).get("tp")
    if saved_tp and "vocab_size" in saved:
        rows = padded_vocab_size(saved["vocab_size"],
                                 saved.get("make_vocab_size_divisible_by", 128), saved_tp)
        if rows != layout.padded_vocab_size:
            raise CheckpointError(
                f"{path} stores its embedding padded to {rows} rows (vocab {saved['vocab_size']} "
                f"at tp={saved_tp}); this run at tp={layout.tp} pads to "
                f"{layout.padded_vocab_size} (a multiple of model.make_vocab_size_divisible_by "
                f"{model_config.make_vocab_size_divisible_by} * tp, Megatron's convention). Choose a "
                f"tp whose padding gives {rows} rows (tp={saved_tp} does).")


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler, model_config,
                    layout) -> dict:
    """Collective: load ``path`` into this rank's model chunks, optimizer and scheduler.

    Returns ``{"iteration", "consumed_samples", "has_optimizer", "config", "callbacks"}`` (the
    saved run's resolved config and its callback state, {} when it has none). A model-only
    checkpoint (e.g. imported from Hugging Face) loads the weights and leaves optimizer and
    schedule fresh.
    """
    from megatron.core import dist_checkpointing

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
    if meta.dims == layout.dims and has_optimizer:
        sharded["rng_state"] = _rng_object(layout)
    with megatron_quiet():
        state = dist_checkpointing.load(sharded, str(path))
    for key, chunk in zip(model_keys(model_chunks), model_chunks):
        _unwrap(chunk).load_state_dict(state[key], strict=False)
    if has_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
    else:
        optimizer.reload_model_params()
    if "rng_state" in state:
        _restore_rng(state["rng_state"])
    return {"iteration": int(common.get("iteration", 0)) if has_optimizer else 0,
            "consumed_samples": int(common.get("consumed_samples", 0)) if has_optimizer else 0,
            "has_optimizer": has_optimizer, "config": meta.config,
            "callbacks": common.get("callbacks") or {}}


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

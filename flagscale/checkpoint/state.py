"""Save and load megatron-core ``torch_dist`` checkpoints of a training run.

A checkpoint holds the model (every tensor a ShardedTensor with its global shape and offset), the
distributed optimizer's state saved ``fully_reshardable`` (fp32 master weights and Adam moments in
the shape of their parameters), the LR scheduler, per-rank RNG states, the iteration, the consumed
samples and the resolved flagscale config. Because every tensor is stored globally, a checkpoint
loads at any TP/PP/VPP/DP layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from flagscale.checkpoint.meta import RESHARDABLE, CheckpointMeta, check_resumable
from flagscale.checkpoint.paths import (complete_checkpoints, iteration_dir, partial_dir,
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
                    keep_last: Optional[int] = None,
                    optimizer_sharding: str = RESHARDABLE,
                    callbacks: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory once it is complete.

    ``callbacks`` is the training loop's callback state (picklable, rank 0's copy is saved);
    :func:`load_checkpoint` returns it.

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
    sharded["flagscale"] = CheckpointMeta(config, layout.dims, has_optimizer=True).to_dict()
    with megatron_quiet():
        dist_checkpointing.save(sharded, str(partial), content_metadata=sharding)
    dist.barrier()
    if rank == 0:
        (partial / "flagscale_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if final.exists():
            # Re-saving an iteration (a rerun past it): the new copy is complete, swap it in.
            stale = final.with_name(final.name + ".old")
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        write_latest(checkpoints, final)
        if keep_last:
            for old in complete_checkpoints(checkpoints)[:-keep_last]:
                shutil.rmtree(old)
    dist.barrier()
    return final


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

"""Rewrite a training checkpoint for another TP/PP/VPP/DP layout in one process, tensor by tensor,
without building the model or starting megatron-core's parallel state.

    from flagscale.convert.offline_reshard import reshard_offline
    reshard_offline(plan, out_dir)        # plan: flagscale.checkpoint.reshard.plan_reshard(...)

The output is megatron-core's ``fully_reshardable`` distributed-optimizer format, exactly the
tensors ``DistributedOptimizer.sharded_state_dict(..., 'fully_reshardable')`` saves: for every
model tensor ``K`` (global shape, layer-stacked under ``decoder.layers.``) the fp32 master
weights, first and second Adam moments as ``optimizer.state.{param,exp_avg,exp_avg_sq}.K`` in
K's global shape, with the optimizer's non-tensor state (param groups with their step count,
grad scaler) in the common state. Such a checkpoint loads at any layout, so ``checkpoint.load``
of the output resumes at the target layout.

Where the state comes from:

- model weights: already global tensors in torch_dist; copied region by region.
- ``dp_reshardable`` optimizer state (training's save): flat DDP-bucket buffers, one per (tp, pp,
  vpp) rank and bucket, each DP rank's slice a chunk of its own. The checkpoint's
  :attr:`~flagscale.checkpoint.meta.CheckpointMeta.param_index_maps` place every parameter in
  them. Each TP shard is read (only its byte range, from every DP rank's chunk that holds a
  part) and written as the chunk of the global tensor it is: its slice along the TP axis, or
  for fc1, whose shards are [gate_i; up_i], its rows of the gate half and of the up half of
  the global [gate; up]. A parameter held on several pipeline stages (a tied output layer) is
  taken from the first.
- ``fully_reshardable`` state: already in parameter shapes; copied like the weights.

Embedding and output-layer rows (weights, master weights, both moments) are trimmed or
zero-padded to the target layout's vocabulary padding. The RNG states are kept when TP and PP do
not change; at another TP/PP they belong to no rank of the new layout and are left out (a resume
seeds afresh, as it does at any new layout).

Memory: the chunks queued for writing, at most the largest chunk's bytes ahead of the disk (a
stored chunk of a model tensor, or one TP shard of one state kind). Chunks are memory-mapped from
the source files rather than read into buffers, so a byte is copied once, into the output file;
only embedding and output-layer tensors in their global shape (the weights; the optimizer state
of a ``fully_reshardable`` source) are read and rebuilt whole when their vocabulary rows change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from flagscale.checkpoint.meta import RESHARDABLE, TRAINING_SHARDING, CheckpointMeta
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.checkpoint.reshard import ReshardPlan, layout_config
from flagscale.checkpoint.state import read_run_state
from flagscale.config import config_to_dict, padded_vocab_size
from flagscale.convert.torch_dist_writer import TorchDistWriter
from flagscale.errors import CheckpointError

KINDS = ("param", "exp_avg", "exp_avg_sq")
"""The distributed optimizer's per-parameter state: fp32 master weights and both Adam moments."""
STATE_PREFIX = "optimizer.state"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Tensors with one row per (padded) vocabulary entry."""
LAYERS = "decoder.layers."
"""Prefix of megatron-core's layer-stacked tensors (leading axis: the global layer number)."""
GATED_FC1 = "mlp.linear_fc1.weight"
"""Every flagscale model family is gated (SwiGLU, ``gated_linear_unit=True`` in
:mod:`flagscale.models.spec`): a TP shard of fc1 holds its gate rows, then its up rows."""
_BUCKET_OBJECT = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.(\w+)/")
_BUCKET_SIZES = ("per_bucket_numel", "per_bucket_numel_unpadded")  # bucket-space only


@dataclass(frozen=True)
class _Shard:
    buffer: str
    """The bucket's tensor prefix (``...bucket_idx_N``); ``.param`` etc. are appended."""
    start: int


@dataclass(frozen=True)
class _Param:
    """One parameter's optimizer state in the flat buffers: a layer of ``key`` (or all of it)."""

    key: str
    layer: Optional[int]
    shape: tuple[int, ...]
    tp_axis: Optional[int]
    shards: tuple[_Shard, ...]
    """By TP rank (one entry for a replicated parameter)."""

    @property
    def gated(self) -> bool:
        return self.key.endswith(GATED_FC1) and self.tp_axis == 0 and len(self.shards) > 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layered(key: str) -> bool:
    for kind in KINDS:
        key = key.removeprefix(f"{STATE_PREFIX}.{kind}.")
    return key.startswith(LAYERS)


def _bucket_params(path: Path, maps: list, tp: int, reader: CheckpointReader) -> list[_Param]:
    """Every parameter's shards in the flat buffers, from the checkpoint's index maps; a
    CheckpointError naming what is missing when they do not cover every model tensor."""
    placed: dict[tuple, dict[int, dict[int, tuple[str, dict]]]] = {}
    for entry in maps:
        for bucket in entry["buckets"]:
            for kind in KINDS:
                name = f"{bucket['key']}.{kind}"
                if name not in reader.tensors:
                    raise CheckpointError(
                        f"{path} is missing the optimizer buffer '{name}' of tp rank "
                        f"{entry['tp_rank']}, pp rank {entry['pp_rank']} (its index map names "
                        f"it): a rank's shard was not saved. Use a complete checkpoint.")
                if tuple(reader.shape(name)) != (bucket["numel"],):
                    raise CheckpointError(
                        f"{path}: optimizer buffer '{name}' holds {tuple(reader.shape(name))} "
                        f"elements, its index map says ({bucket['numel']},).")
            for p in bucket["params"]:
                placed.setdefault((p["key"], p["layer"]), {}).setdefault(
                    entry["pp_rank"], {})[entry["tp_rank"]] = (bucket["key"], p)
    params = []
    for (key, layer), stages in placed.items():
        ranks = stages[min(stages)]  # a tied output layer's copy on the last stage is the same
        first = ranks[min(ranks)][1]
        wanted = list(range(tp)) if first["tp_axis"] is not None else [0]
        missing = [r for r in wanted if r not in ranks]
        if missing:
            raise CheckpointError(f"{path}: the index maps place no TP shard of rank(s) "
                                  f"{missing} of '{first['name']}': a rank's shard is missing.")
        local = _numel(first["shape"]) // len(wanted)
        for r in wanted:
            p = ranks[r][1]
            if p["end"] - p["start"] != local:
                raise CheckpointError(f"{path}: '{first['name']}' of tp rank {r} spans "
                                      f"{p['end'] - p['start']} elements in its bucket, expected "
                                      f"{local} ({first['shape']} over {len(wanted)} rank(s)).")
        params.append(_Param(key, layer, tuple(first["shape"]), first["tp_axis"],
                             tuple(_Shard(ranks[r][0], ranks[r][1]["start"]) for r in wanted)))
    return params


def _check_covered(path: Path, reader: CheckpointReader,
                   params: Optional[list[_Param]]) -> None:
    """Every stored tensor whole (no rank's chunk missing), and (``params``: bucket-space state)
    optimizer state for every layer of every model tensor."""
    for key, md in reader.tensors.items():
        stored = sum(_numel(chunk.sizes) for chunk in md.chunks)
        if stored < _numel(md.size):
            raise CheckpointError(f"{path}: tensor '{key}' {tuple(md.size)} is stored only in "
                                  f"part ({stored} of {_numel(md.size)} elements): a rank's shard "
                                  f"is missing. Use a complete checkpoint.")
    if params is None:
        return
    have = {(p.key, p.layer) for p in params}
    for key in _model_keys(reader):
        layers = range(reader.shape(key)[0]) if _layered(key) else [None]
        missing = [layer for layer in layers if (key, layer) not in have]
        if missing:
            raise CheckpointError(f"{path}: the index maps place no optimizer state for "
                                  f"'{key}' (layers {missing}). The checkpoint's maps are "
                                  f"incomplete; convert it with the flagscale version that "
                                  f"wrote it.")


def _model_keys(reader: CheckpointReader) -> list[str]:
    return [key for key in reader.tensors if not key.startswith("optimizer.")]


def _optimizer_common(path: Path, reader: CheckpointReader, common: dict) -> dict:
    """The optimizer's non-tensor state as a ``fully_reshardable`` save has it in the common
    state: param groups (union over the source's ranks; one step count), grad scaler."""
    if common["optimizer"].get("param_state_sharding_type") == RESHARDABLE:
        return common["optimizer"]
    per_rank: dict[int, dict] = {}
    for unique_key in reader.objects:
        match = _BUCKET_OBJECT.match(unique_key)
        if match and match[2] not in _BUCKET_SIZES:
            per_rank.setdefault(int(match[1]), {})[match[2]] = reader.read_object(unique_key)
    if not per_rank:
        raise CheckpointError(f"{path} holds no distributed-optimizer state objects "
                              f"(optimizer.distributed.dp_group_idx_*.optimizer).")
    groups, steps = {}, set()
    for index in sorted(per_rank):
        for group in per_rank[index]["optimizer"]["param_groups"]:
            ident = tuple(group.get(k) for k in ("wd_mult", "lr_mult", "is_expert_parallel",
                                                 "is_decoupled_lr"))
            groups.setdefault(ident, group)
            steps.add(group.get("step"))
    if len(steps) != 1:
        raise CheckpointError(f"{path}: the ranks' optimizer step counts differ ({sorted(steps)});"
                              f" the checkpoint mixes iterations.")
    state = dict(per_rank[min(per_rank)])
    state["optimizer"] = {**state["optimizer"], "param_groups": list(groups.values())}
    state["param_state_sharding_type"] = RESHARDABLE
    return state


class _Rows:
    """Trim or zero-pad the vocabulary rows of the embedding and output layer."""

    def __init__(self, plan: ReshardPlan):
        model = plan.config.model
        self.target = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by,
                                        plan.target_dims.tp)

    def applies(self, key: str) -> bool:
        return key.endswith(VOCAB_KEYS) and not _layered(key)

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.target, *shape[1:]) if self.applies(key) else tuple(shape)

    def fit(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if not self.applies(key) or tensor.shape[0] == self.target:
            return tensor
        if tensor.shape[0] > self.target:
            return tensor[:self.target]
        pad = tensor.new_zeros((self.target - tensor.shape[0], *tensor.shape[1:]))
        return torch.cat([tensor, pad])


def _pieces(param: _Param, rows: Optional[int]) -> list[tuple[tuple, tuple, Optional[_Shard]]]:
    """The output chunks of one parameter's state: ``(offsets, sizes, run)`` in the parameter's
    global tensor, each a contiguous run of one TP shard starting at ``run`` (the shard's
    [gate; up] halves of fc1 are two), or zeros (``run`` None) for
    vocabulary rows the target padding adds. ``rows``: the target's vocabulary rows, for the
    embedding and output layer (None for the rest)."""
    shape, tp = param.shape, len(param.shards)
    axis = param.tp_axis if tp > 1 else None
    local = list(shape)
    if axis is not None:
        local[axis] //= tp
    runs = []
    for rank, shard in enumerate(param.shards):
        if param.gated:
            half, total, row = local[0] // 2, shape[0] // 2, _numel(shape[1:])
            runs.append(((rank * half, 0), (half, *shape[1:]), shard))
            runs.append(((total + rank * half, 0), (half, *shape[1:]),
                         _Shard(shard.buffer, shard.start + half * row)))
        else:
            offsets = [0] * len(shape)
            if axis is not None:
                offsets[axis] = rank * local[axis]
            runs.append((tuple(offsets), tuple(local), shard))
    if rows is None or rows == shape[0]:
        return runs
    if axis not in (None, 0):
        raise CheckpointError(f"'{param.key}' is split along axis {axis}; its vocabulary rows "
                              f"cannot be trimmed or padded.")
    fitted = []
    for offsets, sizes, run in runs:  # rows past the target's padding are dropped
        keep = min(sizes[0], rows - offsets[0])
        if keep > 0:
            fitted.append((offsets, (keep, *sizes[1:]), run))
    if rows > shape[0]:
        fitted.append(((shape[0],) + (0,) * (len(shape) - 1),
                       (rows - shape[0], *shape[1:]), None))
    return fitted


def _objects(plan: ReshardPlan, reader: CheckpointReader) -> list[str]:
    """The source's ShardedObjects the output keeps: the layers' extra state (layout-free), and
    the RNG states while TP and PP stay."""
    src, dst = plan.source_dims, plan.target_dims
    keep_rng = (src.tp, src.pp) == (dst.tp, dst.pp)
    return [key for key in reader.objects if not key.startswith("optimizer.")
            and (keep_rng or not key.startswith("rng_state/"))]


def reshard_offline(plan: ReshardPlan, output: Path, progress: bool = True,
                    log: Callable[[str], None] = print) -> tuple[int, int]:
    """Write ``plan``'s source checkpoint for ``plan.target_dims`` into the existing, empty
    directory ``output`` (see the module docstring). Every check runs before the first byte is
    written. Returns the number of (model, optimizer state) tensors written."""
    source = plan.source
    common = read_run_state(source)
    meta = CheckpointMeta.from_common(common)
    reader = CheckpointReader(source)
    try:
        params = None
        if plan.source_sharding == TRAINING_SHARDING:
            params = _bucket_params(source, meta.param_index_maps, plan.source_dims.tp, reader)
        _check_covered(source, reader, params)
        optimizer = _optimizer_common(source, reader, common)
        rows = _Rows(plan)
        return _write(plan, reader, common, meta, optimizer, params, rows, Path(output),
                      progress)
    finally:
        reader.close()


@dataclass(frozen=True)
class _Job:
    """One chunk of the output: region ``offsets`` of tensor ``key`` (global ``shape``)."""

    key: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int
    read: Callable[[], torch.Tensor]


def _copy_jobs(reader: CheckpointReader, keys: list[str], rows: _Rows) -> list[_Job]:
    """Tensors stored in their global shape: copied chunk by chunk as stored, or (where the
    vocabulary rows change) one tensor at a time."""
    jobs = []
    for key in keys:
        shape = tuple(reader.shape(key))
        out = rows.shape(key, shape)
        element = torch.empty((), dtype=reader.dtype(key)).element_size()
        if out == shape:
            for chunk in reader.tensors[key].chunks:
                region = (tuple(chunk.offsets), tuple(chunk.sizes))

                def read(key=key, chunk=chunk, region=region):
                    mapped = reader.map_chunk(key, chunk)
                    return mapped if mapped is not None else reader.read({key: region})[key]

                jobs.append(_Job(key, out, region[0], _numel(region[1]) * element, read))
        elif _layered(key):
            for layer in range(shape[0]):
                region = ((layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
                jobs.append(_Job(key, out, region[0], _numel(out[1:]) * element,
                                 lambda key=key, region=region: reader.read({key: region})[key]))
        else:
            jobs.append(_Job(key, out, (0,) * len(shape), _numel(out) * element,
                             lambda key=key: rows.fit(key, reader.read_full(key))))
    return jobs


def _state_jobs(path: Path, reader: CheckpointReader, params: list[_Param],
                rows: _Rows) -> list[_Job]:
    """The optimizer state of every parameter, read from the flat buffers one TP shard (one
    contiguous run of it) at a time and written as a chunk of its global tensor."""
    jobs = []
    for param in params:
        saved = tuple(reader.shape(param.key))
        expected = saved[1:] if param.layer is not None else saved
        if param.shape != expected:
            raise CheckpointError(f"{path}: the index maps give '{param.key}' the shape "
                                  f"{param.shape}, its weights are {expected}.")
        out = rows.shape(param.key, saved)
        target_rows = out[0] if rows.applies(param.key) else None
        lead = (param.layer,) if param.layer is not None else ()
        for kind in KINDS:
            dtype = reader.dtype(f"{param.shards[0].buffer}.{kind}")
            element = torch.empty((), dtype=dtype).element_size()
            for offsets, sizes, run in _pieces(param, target_rows):
                chunk = (1,) * len(lead) + sizes

                def read(run=run, kind=kind, chunk=chunk, dtype=dtype):
                    if run is None:
                        return torch.zeros(chunk, dtype=dtype)
                    name, numel = f"{run.buffer}.{kind}", _numel(chunk)
                    mapped = reader.map_flat(name, run.start, numel)
                    if mapped is not None:
                        return mapped.view(chunk)
                    return reader.read_flat(name, run.start, torch.empty(numel, dtype=dtype)
                                            ).view(chunk)

                jobs.append(_Job(f"{STATE_PREFIX}.{kind}.{param.key}", out, lead + offsets,
                                 _numel(sizes) * element, read))
    return jobs


def _write(plan: ReshardPlan, reader: CheckpointReader, common: dict, meta: CheckpointMeta,
           optimizer: dict, params: Optional[list[_Param]], rows: _Rows, output: Path,
           progress: bool) -> tuple[int, int]:
    from tqdm import tqdm

    model_keys = _model_keys(reader)
    if params is None:  # parameter-shaped state: copied like the weights
        jobs = _copy_jobs(reader, list(reader.tensors), rows)
    else:
        jobs = _copy_jobs(reader, model_keys, rows) + _state_jobs(plan.source, reader, params,
                                                                  rows)
    objects = _objects(plan, reader)
    config = config_to_dict(layout_config(plan.config, plan.target_dims))
    out_common = {key: value for key, value in common.items()
                  if key not in ("optimizer", "flagscale", "content_metadata")}
    out_common["optimizer"] = optimizer
    out_common["flagscale"] = CheckpointMeta(config, plan.target_dims, has_optimizer=True,
                                             source=meta.source,
                                             data_fingerprint=meta.data_fingerprint).to_dict()
    out_common["content_metadata"] = {"distrib_optim_sharding_type": RESHARDABLE}
    largest = max(job.nbytes for job in jobs)
    # Queue at most one largest chunk ahead of the disk: peak memory stays a few parameters.
    with TorchDistWriter(output, max_queued_bytes=largest) as writer, \
            tqdm(total=sum(job.nbytes for job in jobs), desc="reshard", unit="B",
                 unit_scale=True, disable=not progress) as bar:
        for job in jobs:
            writer.add_tensor(job.key, job.shape, job.offsets, job.read())
            bar.update(job.nbytes)
        for unique_key in objects:
            writer.add_object(unique_key, reader.read_object(unique_key))
        writer.finish(out_common)
    (output / "flagscale_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    written = {job.key for job in jobs}
    return len(model_keys), len(written) - len(model_keys)

"""What a flagscale checkpoint records about itself (its common state's ``flagscale`` entry), and
the checks that need nothing else: which layout it was saved at, with which optimizer sharding,
and whether it can resume at another layout.

    meta = CheckpointMeta.from_common(read_run_state(path))
    meta.dims.describe(), meta.has_optimizer, meta.config["model"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from flagscale.config import ParallelDims
from flagscale.errors import CheckpointError

FORMAT_VERSION = 1
"""Version of the ``flagscale`` entry; readers accept every older entry (missing keys default)."""

RESHARDABLE = "fully_reshardable"
"""Distributed-optimizer sharding with every optimizer state in its parameter's global shape: it
loads at any TP/PP/DP, but saving it gathers each (tp, pp) rank's whole optimizer state onto
every DP rank. ``flagscale reshard`` writes it, and a resume at another TP/PP/VPP converts to it."""
TRAINING_SHARDING = "dp_reshardable"
"""The sharding training saves (Megatron-LM's default): each rank writes its own slice of the
flat DDP-bucket buffers, no gather, so a save costs at most the rank's own optimizer shard. It
reloads at any DP size; at another TP/PP/VPP it is converted first (:func:`needs_conversion`)."""
LOADABLE_SHARDINGS = ("fully_reshardable", "dp_reshardable", "fully_sharded_model_space",
                      "dp_zero_gather_scatter")
"""Sharding types a same-layout load understands (megatron-core 0.16.1 DistributedOptimizer)."""
DP_ONLY_SHARDINGS = ("dp_reshardable", "dp_zero_gather_scatter")
"""Bucket-space formats: the flat buffers follow one TP/PP/VPP layout's DDP buckets."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The ``flagscale`` entry of a checkpoint's common state."""

    config: dict = field(default_factory=dict)
    """The resolved flagscale config of the run that wrote it (empty when unknown)."""
    dims: Optional[ParallelDims] = None
    """The layout it was saved at; None for a checkpoint that records none."""
    has_optimizer: bool = True
    """Whether it holds optimizer state and schedule (a Hugging Face import holds weights only)."""
    format: int = FORMAT_VERSION
    source: Optional[str] = None
    """The Hugging Face directory an imported checkpoint was made from."""
    data_fingerprint: dict = field(default_factory=dict)
    """The datasets the run trained on, ``{prefix: fingerprint}`` (see
    :mod:`flagscale.data.fingerprint`); empty when unknown."""
    param_index_maps: Optional[list] = None
    """Where every parameter lies in the flat optimizer buffers of a bucket-space
    (``dp_reshardable``) save, one entry per (tp, pp) rank: what an offline tool needs to cut the
    buffers into parameters (:func:`flagscale.checkpoint.state.param_index_map`)."""

    def to_dict(self) -> dict:
        data = {"format": self.format, "config": self.config,
                "layout": self.dims.to_dict() if self.dims else None,
                "has_optimizer": self.has_optimizer}
        optional = {"source": self.source, "data_fingerprint": self.data_fingerprint,
                    "param_index_maps": self.param_index_maps}
        return {**data, **{key: value for key, value in optional.items() if value}}

    @classmethod
    def from_dict(cls, data: dict, has_optimizer: bool = True) -> "CheckpointMeta":
        """Read an entry written by any flagscale version; ``has_optimizer`` is the answer for
        entries that do not say (the caller knows whether the state holds an optimizer)."""
        layout = data.get("layout")
        known = isinstance(layout, dict) and all(isinstance(layout.get(k), int)
                                                 for k in ("tp", "pp", "dp"))
        return cls(config=data.get("config") or {},
                   dims=ParallelDims.from_dict(layout) if known else None,
                   has_optimizer=bool(data.get("has_optimizer", has_optimizer)),
                   format=int(data.get("format", FORMAT_VERSION)), source=data.get("source"),
                   data_fingerprint=data.get("data_fingerprint") or {},
                   param_index_maps=data.get("param_index_maps"))

    @classmethod
    def from_common(cls, common: dict) -> "CheckpointMeta":
        """The entry of a checkpoint's common state (``read_run_state``)."""
        return cls.from_dict(common.get("flagscale") or {}, has_optimizer="optimizer" in common)

    def layout(self, path: Path) -> ParallelDims:
        """:attr:`dims`, or CheckpointError when the checkpoint records no layout."""
        if self.dims is None:
            raise CheckpointError(f"{path} records no flagscale layout (its common state has no "
                                  f"'flagscale.layout' with tp, pp and dp). flagscale reshard "
                                  f"handles checkpoints written by flagscale train.")
        return self.dims


def optimizer_sharding(common: dict) -> str:
    """The distributed-optimizer sharding type a checkpoint was saved with."""
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    return content.get("distrib_optim_sharding_type", RESHARDABLE)


def needs_conversion(common: dict, dims: ParallelDims) -> bool:
    """Whether a checkpoint's optimizer state is in bucket space (``dp_reshardable``) at another
    TP/PP/VPP than ``dims``, so it must be converted to ``fully_reshardable`` before it loads."""
    meta = CheckpointMeta.from_common(common)
    if not meta.has_optimizer or meta.dims is None:
        return False
    saved = meta.dims
    return optimizer_sharding(common) in DP_ONLY_SHARDINGS and (
        saved.tp, saved.pp, saved.vpp) != (dims.tp, dims.pp, dims.vpp)


def check_resumable(path: Path, common: dict, dims: ParallelDims) -> None:
    """Refuse up front, before any tensor is read, to load ``path`` at ``dims`` when its
    optimizer state only reloads at the TP/PP/VPP it was saved at (training converts such a
    checkpoint first; this guards every other loader)."""
    if not needs_conversion(common, dims):
        return
    sharding, saved = optimizer_sharding(common), CheckpointMeta.from_common(common).dims
    raise CheckpointError(
        f"{path} holds '{sharding}' distributed-optimizer state, which megatron-core reloads "
        f"only at the TP/PP it was saved at ({saved.describe()}); this run is "
        f"{dims.describe()}. Convert it once: flagscale reshard --input {path} --output NEW_DIR "
        f"--tp {dims.tp} --pp {dims.pp}, then set checkpoint.load=NEW_DIR.")

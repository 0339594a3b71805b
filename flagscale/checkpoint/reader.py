"""Read global tensors, or slices of them, from a megatron-core ``torch_dist`` checkpoint in one
process, without the world size or layout that wrote it.

torch_dist stores each ShardedTensor under its key with the global shape and the chunks each rank
wrote, so any region of a global tensor can be read directly: TP shards are recombined by their
offsets, and a layer is a slice along the leading layer axis whatever the PP/VPP split was. Only
the stored chunks overlapping the requested region are read, so reading one layer costs about one
layer of memory. No process group is needed (torch.distributed.checkpoint's ``no_dist`` mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from flagscale.errors import CheckpointError


class _RegionPlanner(DefaultLoadPlanner):
    """Plans reads of one region per key into the plain tensors of ``out`` (defined at module
    level: a class made inside ``read`` would keep every layer's tensors alive in reference cycles
    until the garbage collector ran)."""

    def __init__(self, metadata: dict, regions: dict, out: dict):
        super().__init__()
        self.tensor_metadata, self.regions, self.destinations = metadata, regions, out

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, sizes) in self.regions.items():
            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, self.tensor_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.destinations[index.fqn]


class CheckpointReader:
    """Offline reader of one torch_dist checkpoint directory."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise CheckpointError(f"{self.path} is not a torch_dist checkpoint (no .metadata "
                                  f"file). Give an iter_XXXXXXX directory written by flagscale "
                                  f"train or flagscale convert hf-to-mcore.")
        self._reader = FileSystemReader(str(self.path))
        metadata = self._reader.read_metadata()
        self.tensors = {key: md for key, md in metadata.state_dict_metadata.items()
                        if isinstance(md, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of ``key``."""
        return tuple(self._metadata(key).size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self._metadata(key).properties.dtype

    def _metadata(self, key: str):
        if key not in self.tensors:
            raise CheckpointError(f"Tensor '{key}' is not in checkpoint {self.path}; it holds "
                                  f"{len(self.tensors)} tensors (e.g. "
                                  f"{', '.join(sorted(self.tensors)[:3])}). Is it a megatron-core "
                                  f"GPT checkpoint of this model?")
        return self.tensors[key]

    def read(self, requests: dict[str, tuple[Sequence[int], Sequence[int]]]
             ) -> dict[str, torch.Tensor]:
        """Read regions ``{key: (offsets, sizes)}`` of global tensors in one pass, each in its
        stored dtype."""
        import torch.distributed.checkpoint as dcp

        out = {key: torch.empty(tuple(sizes), dtype=self.dtype(key))
               for key, (_, sizes) in requests.items()}
        planner = _RegionPlanner(self.tensors, requests, out)
        dcp.load(out, storage_reader=self._reader, planner=planner, no_dist=True)
        return out

    def read_full(self, key: str) -> torch.Tensor:
        """The whole global tensor ``key``."""
        shape = self.shape(key)
        return self.read({key: ((0,) * len(shape), shape)})[key]

    def read_layer(self, keys: Sequence[str], layer: int) -> dict[str, torch.Tensor]:
        """Slice ``layer`` of each layer-stacked tensor in ``keys`` (the layer axis removed)."""
        requests = {}
        for key in keys:
            shape = self.shape(key)
            if layer >= shape[0]:
                raise CheckpointError(f"Tensor '{key}' in {self.path} stacks {shape[0]} layers; "
                                      f"layer {layer} was requested.")
            requests[key] = ((layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])
        return {key: t[0] for key, t in self.read(requests).items()}


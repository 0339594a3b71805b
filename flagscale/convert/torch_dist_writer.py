"""Write a megatron-core ``torch_dist`` checkpoint one tensor at a time, without a model.

    with TorchDistWriter(tmp) as writer:
        writer.add_tensor("decoder.layers.mlp.linear_fc2.weight", (32, 4096, 14336),
                          (layer, 0, 0), tensor.unsqueeze(0))    # one chunk of a global tensor
        writer.add_object(unique_key, obj)                        # a ShardedObject's data
        writer.finish(common_state)

megatron-core's torch_dist format is torch.distributed.checkpoint's on-disk layout: ``.distcp``
files holding one ``torch.save`` archive per chunk (a ShardedObject is ``torch.save([data])``,
megatron's serialization), a pickled ``Metadata`` in ``.metadata`` with each key's global shape,
dtype and chunks and where each chunk's bytes are, ``common.pt`` with the non-tensor state, and
``metadata.json`` naming the backends. DCP's own save plans every tensor of the state dict at
once; here each chunk is written as soon as it is produced (onto one of a few files, by writer
threads that overlap the caller's reading and converting) and the metadata is written last, so
memory holds only the chunks queued for writing. CRCs are not computed (DCP's reader does not
check them); ``torch.load`` accepts archives without them.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from flagscale.convert.common import WriteQueue

WRITE_THREADS = 4
MAX_QUEUED_BYTES = 1 << 30
"""Bytes of chunks waiting to be written before :meth:`TorchDistWriter.add_tensor` blocks."""


class TorchDistWriter:
    """Streams chunks into ``.distcp`` files of directory ``path`` (which must exist)."""

    def __init__(self, path: str | Path, files: int = WRITE_THREADS,
                 max_queued_bytes: int = MAX_QUEUED_BYTES):
        self.path = Path(path)
        self._names = [f"__0_{i}.distcp" for i in range(files)]
        self._files = [open(self.path / name, "wb") for name in self._names]
        # One lane per file: a file's archives are appended in order by its own thread.
        self._queue = WriteQueue(files, max_queued_bytes)
        self._metadata: dict[str, Any] = {}
        self._storage: dict = {}
        self._lock = threading.Lock()
        self.bytes_written = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._queue.close()
        for f in self._files:
            f.close()

    def _submit(self, index_key, payload, nbytes: int, written=None) -> None:
        slot = self._queue.least_loaded()
        self._queue.submit(slot, nbytes, self._write, slot, index_key, payload, written)

    def _write(self, slot: int, index_key, payload, written=None) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        f = self._files[slot]
        offset = f.tell()
        if isinstance(payload, torch.Tensor):
            with _no_crc32():
                torch.save(payload, f)
        else:
            f.write(payload)
        length = f.tell() - offset
        with self._lock:
            self._storage[index_key] = _StorageInfo(self._names[slot], offset, length)
            self.bytes_written += length
        if written is not None:
            written()

    def add_tensor(self, key: str, global_shape: Sequence[int], offsets: Sequence[int],
                   chunk: torch.Tensor, written: Optional[Callable[[], object]] = None) -> None:
        """Queue ``chunk``, the region of global tensor ``key`` starting at ``offsets``;
        ``written()`` is called once its bytes are written (its memory may then be reused)."""
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                           TensorProperties,
                                                           TensorStorageMetadata)

        chunk = chunk.detach().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save writes the whole storage behind a view
        with self._lock:
            md = self._metadata.get(key)
            if md is None:
                md = self._metadata[key] = TensorStorageMetadata(
                    TensorProperties(dtype=chunk.dtype), torch.Size(global_shape), [])
            md.chunks.append(ChunkStorageMetadata(torch.Size(offsets), chunk.shape))
        self._submit(MetadataIndex(key, torch.Size(offsets)), chunk,
                     chunk.numel() * chunk.element_size(), written)

    def add_object(self, unique_key: str, obj: Any) -> None:
        """Queue a ShardedObject's data under its unique key (``key/shard_<offset>_<shape>``)."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        buffer = io.BytesIO()
        torch.save([obj], buffer)  # megatron-core saves the list of a key's objects
        with self._lock:
            self._metadata[unique_key] = BytesStorageMetadata()
        self._submit(MetadataIndex(unique_key), buffer.getvalue(), buffer.tell())

    def finish(self, common_state: dict) -> None:
        """Wait for every chunk, then write ``.metadata``, ``common.pt`` and ``metadata.json``
        (megatron-core's checkpoint config). Call once, last."""
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        self._queue.wait()
        for f in self._files:
            f.flush()
        metadata = Metadata(self._metadata, planner_data=None, storage_data=self._storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.path),
                                                     save_id=str(uuid.uuid4())),
                            version=CURRENT_DCP_VERSION)
        with open(self.path / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        torch.save(common_state, self.path / "common.pt")
        (self.path / "metadata.json").write_text(json.dumps(
            {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
             "common_backend": "torch", "common_backend_version": 1}))


class _no_crc32:
    """torch.save without zip CRCs: a CRC pass costs about as much as writing the bytes, and
    neither torch.distributed.checkpoint's reader nor torch.load needs it. The setting is
    process-wide; only the converter's writer threads save while it is off."""

    _depth = 0
    _lock = threading.Lock()
    _saved = True

    def __enter__(self):
        from torch.utils.serialization import config

        with _no_crc32._lock:
            if _no_crc32._depth == 0:
                _no_crc32._saved = config.save.compute_crc32
                config.save.compute_crc32 = False
            _no_crc32._depth += 1

    def __exit__(self, *exc):
        from torch.utils.serialization import config

        with _no_crc32._lock:
            _no_crc32._depth -= 1
            if _no_crc32._depth == 0:
                config.save.compute_crc32 = _no_crc32._saved

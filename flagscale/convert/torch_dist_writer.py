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
memory holds only the chunks queued for writing. A chunk whose bytes already lie in other files
(:class:`FileBytes`: an import's rows of the Hugging Face safetensors) gets torch.save's archive
with its storage bytes copied file to file by the kernel, so they never pass through the
process. CRCs are not computed (DCP's reader does not check them); ``torch.load`` accepts
archives without them.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from flagscale.convert.common import FileBytes, WriteQueue
from flagscale.errors import ConversionError

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

    def _submit(self, index_key, payload, nbytes: int) -> None:
        slot = self._queue.least_loaded()
        self._queue.submit(slot, nbytes, self._write, slot, index_key, payload)

    def _write(self, slot: int, index_key, payload) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        f = self._files[slot]
        offset = f.tell()
        if isinstance(payload, torch.Tensor):
            with _no_crc32():
                torch.save(payload, f)
        elif isinstance(payload, FileBytes):
            _save_copied(f, payload)
        else:
            f.write(payload)
        length = f.tell() - offset
        with self._lock:
            self._storage[index_key] = _StorageInfo(self._names[slot], offset, length)
            self.bytes_written += length

    def add_tensor(self, key: str, global_shape: Sequence[int], offsets: Sequence[int],
                   chunk: Union[torch.Tensor, FileBytes]) -> None:
        """Queue ``chunk``, the region of global tensor ``key`` starting at ``offsets`` (a
        :class:`FileBytes` with its dtype is copied from its files)."""
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                           TensorProperties,
                                                           TensorStorageMetadata)

        if isinstance(chunk, FileBytes):
            if chunk.dtype is None:
                raise ConversionError(f"Internal error: the file bytes of '{key}' have no dtype.")
            dtype, nbytes = chunk.dtype, chunk.nbytes
        else:
            chunk = chunk.detach().contiguous()
            if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
                chunk = chunk.clone()  # torch.save writes the whole storage behind a view
            dtype, nbytes = chunk.dtype, chunk.numel() * chunk.element_size()
        with self._lock:
            md = self._metadata.get(key)
            if md is None:
                md = self._metadata[key] = TensorStorageMetadata(
                    TensorProperties(dtype=dtype), torch.Size(global_shape), [])
            md.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(chunk.shape)))
        self._submit(MetadataIndex(key, torch.Size(offsets)), chunk, nbytes)

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


class _SkippedRecords:
    """The file object torch.save writes into: writes go to ``f``, and each record whose bytes
    torch seeks over instead of writing (``skip_data``) is noted as ``(position, nbytes)``."""

    def __init__(self, f):
        self.f, self.skipped = f, []

    def write(self, data) -> int:
        return self.f.write(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            self.skipped.append((self.f.tell(), offset))
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()


def _save_copied(f, chunk: FileBytes) -> None:
    """Append to ``f`` torch.save's archive of the tensor ``chunk`` describes, its storage bytes
    copied from their files: torch.save under ``skip_data`` writes every record of the archive
    but the storage's, whose place it seeks over, given an uninitialised tensor of that shape
    (its memory is reserved, never touched)."""
    out = _SkippedRecords(f)
    with _no_crc32(), torch.serialization.skip_data():
        torch.save(torch.empty(chunk.shape, dtype=chunk.dtype), out)
    expected = [chunk.nbytes] if chunk.nbytes else []
    if [nbytes for _, nbytes in out.skipped] != expected:
        raise ConversionError(f"Internal error: torch.save left {out.skipped} for the storage "
                              f"bytes (position, bytes) of a {chunk.nbytes}-byte tensor.")
    f.flush()
    for position, _ in out.skipped:
        chunk.write(f.fileno(), position)


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

"""Read global tensors, or slices of them, from a megatron-core ``torch_dist`` checkpoint in one
process, without the world size or layout that wrote it.

torch_dist stores each ShardedTensor under its key with the global shape and the chunks each rank
wrote, so any region of a global tensor can be read directly: TP shards are recombined by their
offsets, and a layer is a slice along the leading layer axis whatever the PP/VPP split was. Only
the stored chunks overlapping the requested region are read, so reading one layer costs about one
layer of memory.

Each chunk is a ``torch.save`` archive at a known offset of a ``.distcp`` file (the checkpoint's
``.metadata`` gives file, offset and length). torch.distributed.checkpoint reads one by copying the
archive into memory, ``torch.load``-ing it and copying the result into place; here the archive's
small index and pickle are parsed and the tensor bytes are read straight into the destination
(one copy), several chunks at a time on a thread pool (file reads release the GIL). An archive
this parser does not recognise (a transformed/compressed chunk) falls back to ``torch.load``.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from flagscale.errors import CheckpointError

READ_THREADS = min(8, os.cpu_count() or 1)
_HUGE_PAGE = 1 << 21


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor to read into. One of 2 MiB or more gets its own mapping backed
    by transparent huge pages where the kernel offers them: faulting in fresh 4 KiB pages costs
    about three times the read itself (measured), and conversions fill gigabytes of them."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(tuple(shape), dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    # The tensor holds the mapping; it is unmapped when the last view of it is freed.
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(tuple(shape))


class _Slice(io.RawIOBase):
    """The bytes ``[start, start + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = base + pos
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class _RawTensor:
    """Where a saved tensor's elements lie in a ``.distcp`` file."""

    position: int
    """Absolute file offset of element 0 of the tensor's storage."""
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Rebuild:
    """Records ``torch._utils._rebuild_tensor_v2``'s arguments instead of building a tensor."""

    def __init__(self, storage, storage_offset, size, stride, *_):
        self.storage, self.storage_offset = storage, storage_offset
        self.size, self.stride = tuple(size), tuple(stride)


# The storage classes torch.save names in a tensor's pickle, by the dtype they hold.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16,
                   "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


class _TensorPickle(pickle.Unpickler):
    """Reads the ``data.pkl`` of a saved plain tensor without loading its storage."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        return key, dtype


def _member_position(fd: int, start: int, info: zipfile.ZipInfo) -> int:
    """File offset of a stored member's bytes. The local header repeats the name and may carry
    its own extra field (the 64-byte alignment padding torch writes), so the offset comes from
    it, not the central index."""
    header = os.pread(fd, 30, start + info.header_offset)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + info.header_offset + 30 + name_len + extra_len


def _locate(fd: int, start: int, length: int) -> Optional[_RawTensor]:
    """Parse the torch.save archive at ``start``; None when it is not one plain tensor."""
    try:
        with zipfile.ZipFile(_Slice(fd, start, length)) as archive:
            names = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
            pkl = names["data.pkl"]
            if pkl.compress_type != zipfile.ZIP_STORED:
                return None
            # Read past zipfile: archives saved without CRCs (torch's compute_crc32=False, as
            # flagscale's converter writes them) fail its CRC check; torch.load ignores CRCs.
            raw = os.pread(fd, pkl.file_size, _member_position(fd, start, pkl))
            rebuilt = _TensorPickle(io.BytesIO(raw)).load()
            if not isinstance(rebuilt, _Rebuild):
                return None
            key, dtype = rebuilt.storage
            info = names[f"data/{key}"]
            if info.compress_type != zipfile.ZIP_STORED:
                return None
    except (zipfile.BadZipFile, KeyError, pickle.UnpicklingError, ValueError, TypeError):
        return None
    position = _member_position(fd, start, info)
    return _RawTensor(position, dtype, rebuilt.storage_offset, rebuilt.size, rebuilt.stride)


def _read_raw(fd: int, raw: _RawTensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The saved tensor, read into ``out`` (a contiguous tensor of its shape) when given."""
    element = torch.empty((), dtype=raw.dtype).element_size()
    numel = 1
    for n in raw.size:
        numel *= n
    contiguous = torch.empty(raw.size, device="meta").stride() == raw.stride or numel <= 1
    if contiguous:
        target = out if out is not None else empty(raw.size, raw.dtype)
        _pread_into(fd, target, raw.position + raw.storage_offset * element)
        return target
    extent = raw.storage_offset + 1 + sum((n - 1) * s for n, s in zip(raw.size, raw.stride))
    storage = torch.empty(extent, dtype=raw.dtype)
    _pread_into(fd, storage, raw.position)
    tensor = storage.as_strided(raw.size, raw.stride, raw.storage_offset)
    if out is None:
        return tensor
    return out.copy_(tensor)


def _pread_into(fd: int, tensor: torch.Tensor, position: int) -> None:
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], position + done)
        if n <= 0:
            raise CheckpointError(f"Unexpected end of file reading {len(view)} bytes at offset "
                                  f"{position}: the checkpoint file is truncated.")
        done += n


def _index(key: str, chunk):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(key, chunk.offsets)


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
        try:
            metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as exc:  # a damaged pickle surfaces in many types
            raise CheckpointError(f"{self.path / '.metadata'} cannot be read ({exc}).") from None
        self.tensors = {key: md for key, md in metadata.state_dict_metadata.items()
                        if isinstance(md, TensorStorageMetadata)}
        self.objects = [key for key, md in metadata.state_dict_metadata.items()
                        if not isinstance(md, TensorStorageMetadata)]
        """Unique keys (``key/shard_...``) of the ShardedObjects stored."""
        self._storage = metadata.storage_data
        self._fds: dict[str, int] = {}
        self._located: dict[tuple, Optional[_RawTensor]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="flagscale-ckpt-read")

    def close(self) -> None:
        """Close the open ``.distcp`` files and the read threads."""
        self._pool.shutdown()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_fds", None):
            self.close()

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of ``key``."""
        return tuple(self._metadata(key).size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self._metadata(key).properties.dtype

    def nbytes(self) -> int:
        """Bytes of all tensors, as stored."""
        total = 0
        for md in self.tensors.values():
            numel = 1
            for n in md.size:
                numel *= n
            total += numel * torch.empty((), dtype=md.properties.dtype).element_size()
        return total

    def _metadata(self, key: str):
        if key not in self.tensors:
            raise CheckpointError(f"Tensor '{key}' is not in checkpoint {self.path}; it holds "
                                  f"{len(self.tensors)} tensors (e.g. "
                                  f"{', '.join(sorted(self.tensors)[:3])}). Is it a megatron-core "
                                  f"GPT checkpoint of this model?")
        return self.tensors[key]

    def _fd(self, relative: str) -> int:
        with self._lock:
            if relative not in self._fds:
                path = self.path / relative
                try:
                    self._fds[relative] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"Cannot open {path}, a shard file the checkpoint's "
                                          f".metadata lists ({exc.strerror}).") from None
            return self._fds[relative]

    def _raw(self, key: str, chunk) -> Optional[_RawTensor]:
        """Where a stored chunk's elements lie; None for an archive :func:`_locate` does not
        parse (read through ``torch.load``)."""
        cached = (key, tuple(chunk.offsets))
        if cached not in self._located:
            info = self._storage[_index(key, chunk)]
            self._located[cached] = (None if info.transform_descriptors else
                                     _locate(self._fd(info.relative_path), info.offset,
                                             info.length))
        return self._located[cached]

    def row_ranges(self, key: str, rows: Sequence[tuple[int, int]], layer: Optional[int] = None
                   ) -> Optional[list[tuple[int, int, int]]]:
        """Where rows ``[start, stop)`` of ``key`` (of transformer layer ``layer`` of a tensor
        stacked over layers) lie in the ``.distcp`` files, in order: ``(fd, position, nbytes)``
        byte ranges whose concatenation is those rows as stored, to be copied file to file.
        None where that does not hold: a chunk splits rows (a tensor-parallel split of columns)
        or is not a plain contiguous saved tensor."""
        md = self._metadata(key)
        axis = 0 if layer is None else 1
        row_numel = 1
        for n in md.size[axis + 1:]:
            row_numel *= n
        element = torch.empty((), dtype=md.properties.dtype).element_size()
        ranges: list[tuple[int, int, int]] = []
        for start, stop in rows:
            pieces = []
            for chunk in md.chunks:
                first = chunk.offsets[axis]
                lo, hi = max(start, first), min(stop, first + chunk.sizes[axis])
                if hi <= lo or (layer is not None and not
                                chunk.offsets[0] <= layer < chunk.offsets[0] + chunk.sizes[0]):
                    continue
                raw = self._raw(key, chunk)
                if list(chunk.sizes[axis + 1:]) != list(md.size[axis + 1:]) or raw is None or \
                        tuple(raw.size) != tuple(chunk.sizes) or \
                        tuple(raw.stride) != torch.empty(raw.size, device="meta").stride():
                    return None
                row = lo - first + (0 if layer is None else
                                    (layer - chunk.offsets[0]) * chunk.sizes[1])
                fd = self._fd(self._storage[_index(key, chunk)].relative_path)
                pieces.append((lo, hi, fd, raw.position + (raw.storage_offset + row * row_numel)
                               * element))
            pieces.sort()
            if sum(hi - lo for lo, hi, _, _ in pieces) != stop - start:
                return None
            for lo, hi, fd, position in pieces:
                nbytes = (hi - lo) * row_numel * element
                if ranges and ranges[-1][0] == fd and sum(ranges[-1][1:]) == position:
                    ranges[-1] = (fd, ranges[-1][1], ranges[-1][2] + nbytes)  # one longer copy
                else:
                    ranges.append((fd, position, nbytes))
        return ranges

    def _read_chunk(self, key: str, chunk, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One stored chunk of ``key``, whole (into ``out``, contiguous, when given)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._storage[MetadataIndex(key, chunk.offsets)]
        fd = self._fd(info.relative_path)
        raw = self._raw(key, chunk)
        if raw is None or tuple(raw.size) != tuple(chunk.sizes):
            data = torch.load(_Slice(fd, info.offset, info.length), map_location="cpu",
                              weights_only=True)
            return data if out is None else out.copy_(data)
        return _read_raw(fd, raw, out)

    def read(self, requests: dict[str, tuple[Sequence[int], Sequence[int]]]
             ) -> dict[str, torch.Tensor]:
        """Read regions ``{key: (offsets, sizes)}`` of global tensors in one pass, each in its
        stored dtype."""
        out, jobs = {}, []
        for key, (offsets, sizes) in requests.items():
            md = self._metadata(key)
            out[key] = empty(tuple(sizes), md.properties.dtype)
            covered = 0
            for chunk in md.chunks:
                lo = [max(a, b) for a, b in zip(offsets, chunk.offsets)]
                hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, chunk.offsets,
                                                                chunk.sizes)]
                if all(h > l for l, h in zip(lo, hi)):
                    jobs.append((key, chunk, lo, hi, offsets))
                    volume = 1
                    for l, h in zip(lo, hi):
                        volume *= h - l
                    covered += volume
            if covered != out[key].numel():
                raise CheckpointError(f"Checkpoint {self.path} does not hold all of the requested "
                                      f"region {tuple(offsets)}+{tuple(sizes)} of '{key}' (its "
                                      f"chunks cover {covered} of {out[key].numel()} elements).")

        def run(job):
            key, chunk, lo, hi, offsets = job
            dst = out[key][tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))]
            whole = list(lo) == list(chunk.offsets) and list(dst.shape) == list(chunk.sizes)
            if whole and dst.is_contiguous():
                self._read_chunk(key, chunk, dst)  # straight into place: the common case
                return
            data = self._read_chunk(key, chunk)
            dst.copy_(data[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk.offsets))])

        for result in self._pool.map(run, jobs):
            del result
        return out

    def read_flat(self, key: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``[start, start + out.numel())`` of the 1-D tensor ``key`` (a flat optimizer
        buffer of a ``dp_reshardable`` save), read into ``out``: only those bytes of the stored
        chunks are read, straight into place."""
        md = self._metadata(key)
        end = start + out.numel()
        if len(md.size) != 1 or end > md.size[0] or md.properties.dtype != out.dtype:
            raise CheckpointError(f"Elements [{start}, {end}) of '{key}' ({tuple(md.size)}, "
                                  f"{md.properties.dtype}) in {self.path} cannot be read as "
                                  f"{out.dtype}: the checkpoint does not match its index map.")
        jobs, covered = [], 0
        for chunk in md.chunks:
            lo, hi = max(start, chunk.offsets[0]), min(end, chunk.offsets[0] + chunk.sizes[0])
            if hi > lo:
                jobs.append((chunk, lo, hi))
                covered += hi - lo
        if covered != end - start:
            raise CheckpointError(f"Checkpoint {self.path} holds only {covered} of elements "
                                  f"[{start}, {end}) of '{key}': a rank's shard is missing.")

        def run(job):
            chunk, lo, hi = job
            dst = out[lo - start:hi - start]
            raw = self._raw(key, chunk)
            if raw is None or tuple(raw.size) != tuple(chunk.sizes) or len(raw.stride) != 1 \
                    or raw.stride[0] != 1:
                dst.copy_(self._read_chunk(key, chunk)[lo - chunk.offsets[0]:hi - chunk.offsets[0]])
                return
            element = out.element_size()
            fd = self._fd(self._storage[_index(key, chunk)].relative_path)
            _pread_into(fd, dst, raw.position + (raw.storage_offset + lo - chunk.offsets[0])
                        * element)

        for result in self._pool.map(run, jobs):
            del result
        return out

    def map_flat(self, key: str, start: int, numel: int) -> Optional[torch.Tensor]:
        """Elements ``[start, start + numel)`` of the 1-D tensor ``key`` as a tensor over the
        file's own pages (memory-mapped copy-on-write: no bytes are copied, and the pages go
        when the tensor does), where one stored plain chunk holds them all; None otherwise."""
        for chunk in self._metadata(key).chunks:
            first = chunk.offsets[0]
            if len(chunk.sizes) == 1 and first <= start and start + numel <= first + chunk.sizes[0]:
                return self._map(key, chunk, start - first, (numel,))
        return None

    def map_chunk(self, key: str, chunk) -> Optional[torch.Tensor]:
        """A stored chunk of ``key`` (one of ``tensors[key].chunks``) as :meth:`map_flat` maps
        it; None for one it cannot map."""
        return self._map(key, chunk, 0, tuple(chunk.sizes))

    def _map(self, key: str, chunk, skip: int, shape: tuple) -> Optional[torch.Tensor]:
        raw = self._raw(key, chunk)
        numel = 1
        for n in shape:
            numel *= n
        if raw is None or tuple(raw.size) != tuple(chunk.sizes) or numel == 0 or \
                tuple(raw.stride) != torch.empty(raw.size, device="meta").stride():
            return None
        element = torch.empty((), dtype=raw.dtype).element_size()
        position = raw.position + (raw.storage_offset + skip) * element
        base = position - position % mmap.ALLOCATIONGRANULARITY
        fd = self._fd(self._storage[_index(key, chunk)].relative_path)
        pages = mmap.mmap(fd, position - base + numel * element, offset=base,
                          access=mmap.ACCESS_COPY)
        return torch.frombuffer(pages, dtype=raw.dtype, count=numel,
                                offset=position - base).view(shape)

    def read_object(self, unique_key: str):
        """The data of the stored ShardedObject ``unique_key`` (e.g. ``rng_state/shard_0.0_1.1``)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if unique_key not in self.objects:
            raise CheckpointError(f"Object '{unique_key}' is not in checkpoint {self.path}.")
        info = self._storage[MetadataIndex(unique_key)]
        fd = self._fd(info.relative_path)
        data = torch.load(_Slice(fd, info.offset, info.length), map_location="cpu",
                          weights_only=False)
        # megatron-core saves the list of a key's objects
        return data[0] if isinstance(data, list) and len(data) == 1 else data

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

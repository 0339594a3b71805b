"""Write sharded safetensors files one tensor at a time, and read them back lazily.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the raw bytes. Every shape is known before any tensor is produced, so each file's header is
written first and each tensor is written at its offset as it is produced: memory holds the few
tensors waiting to be written, not a shard. A tensor whose bytes already lie in other files
(:class:`FileBytes`) is copied file to file by the kernel and never enters memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import torch

from flagscale.checkpoint.reader import empty
from flagscale.convert.common import FileBytes, WriteQueue, pwrite_all
from flagscale.errors import ConversionError

WRITE_THREADS = 4
MAX_QUEUED_BYTES = 1 << 30
"""Bytes of tensors waiting to be written before :func:`write_sharded` takes the next one."""

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def plan_shards(entries: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group ``(name, shape)`` entries, in order, into shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own)."""
    size = torch.tensor([], dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for name, shape in entries:
        nbytes = size * math.prod(shape)
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, tuple(shape)))
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """HF's naming: ``model-00001-of-00003.safetensors`` (or ``model.safetensors`` alone)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_sharded(out_dir: Path, shards, dtype: torch.dtype,
                  tensors: Iterator[tuple[str, Union[torch.Tensor, FileBytes]]],
                  max_queued_bytes: int = MAX_QUEUED_BYTES,
                  on_written: Callable[[int], object] = lambda nbytes: None) -> int:
    """Write ``tensors`` (yielded in the planned order) into the planned shards and the
    ``model.safetensors.index.json``; returns the total bytes of tensor data. Every tensor's
    place is known from the plan, so each is written at its offset by one of a few threads
    while the next is produced (at most ``max_queued_bytes`` waiting); ``on_written(nbytes)`` is
    called as each tensor's bytes are written (progress)."""
    names = shard_file_names(len(shards))
    weight_map, total = {}, 0
    element = torch.tensor([], dtype=dtype).element_size()
    queue = WriteQueue(WRITE_THREADS, max_queued_bytes, name="flagscale-safetensors",
                       on_written=on_written)
    fds = []
    try:
        for file_name, shard in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape in shard:
                nbytes = element * math.prod(shape)
                header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = file_name
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
            fd = os.open(out_dir / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
            for name, shape in shard:
                got_name, tensor = next(tensors)
                if got_name != name or tuple(tensor.shape) != shape:
                    raise ConversionError(f"Internal ordering error writing {file_name}: expected "
                                          f"{name} {shape}, got {got_name} "
                                          f"{tuple(tensor.shape)}.")
                start = header[name]["data_offsets"][0]
                queue.submit(queue.least_loaded(), element * math.prod(shape), _write_tensor,
                             fd, 8 + len(raw) + start, tensor, dtype)
                del tensor
            total += offset
        queue.wait()
    finally:
        queue.close()
        for fd in fds:
            os.close(fd)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _write_tensor(fd: int, position: int, tensor: Union[torch.Tensor, FileBytes],
                  dtype: torch.dtype) -> None:
    if isinstance(tensor, FileBytes):
        tensor.write(fd, position)
        return
    data = tensor.to(dtype).contiguous()  # a view (a QKV part) is gathered here, off the caller
    raw = data.view(-1).view(torch.uint8)
    pwrite_all(fd, memoryview(raw.numpy()) if raw.numel() else b"", position)


_FROM_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
               "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
               "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsReader:
    """The tensors of a Hugging Face directory's safetensors files (one file or an indexed set),
    read on demand with ``pread`` into fresh tensors: nothing is memory-mapped, so reading a
    405B model layer by layer keeps one layer resident, not the page cache of every file read.
    """

    def __init__(self, hf_dir: Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a safetensors index ({exc}).") from None
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConversionError(f"{hf_dir} has no model.safetensors or "
                                  f"model.safetensors.index.json; flagscale reads safetensors "
                                  f"weights only (re-save with save_pretrained(safe_serialization="
                                  f"True)).")
        self.where = str(hf_dir)
        self._fds: list[int] = []
        self._entries: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        for name in files:
            path = hf_dir / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise ConversionError(f"Cannot open {path} ({exc.strerror}).") from None
            self._fds.append(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # tensors are read in file order
            try:
                (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, length, 8))
            except (struct.error, ValueError) as exc:
                raise ConversionError(f"{path} is not a safetensors file ({exc}).") from None
            size = os.fstat(fd).st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _FROM_NAMES:
                    raise ConversionError(f"Tensor '{key}' in {path} has dtype {info['dtype']}, "
                                          f"which flagscale does not convert.")
                start = 8 + length + info["data_offsets"][0]
                if 8 + length + info["data_offsets"][1] > size:
                    # Checked here, before any output: the import copies these bytes unread.
                    raise ConversionError(
                        f"{path} is truncated: tensor '{key}' ends at byte "
                        f"{8 + length + info['data_offsets'][1]} of a {size}-byte file. "
                        f"Download or copy it again.")
                self._entries[key] = (len(self._fds) - 1, start, _FROM_NAMES[info["dtype"]],
                                      tuple(info["shape"]))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        if getattr(self, "_fds", None):
            self.close()

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[3]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[2]

    def _entry(self, name: str):
        if name not in self._entries:
            raise ConversionError(f"Tensor '{name}' is missing from {self.where}.")
        return self._entries[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (ConversionError when absent)."""
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def row_bytes(self, name: str, start: int, stop: int) -> tuple[int, int, int]:
        """``(fd, position, nbytes)``: where rows ``start:stop`` of tensor ``name`` lie."""
        file, offset, dtype, shape = self._entry(name)
        row = math.prod(shape[1:]) * dtype.itemsize
        return self._fds[file], offset + start * row, (stop - start) * row

    def rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (its first axis), read straight into ``out``
        (contiguous, of their shape and stored dtype) when given."""
        dtype, shape = self.dtype(name), self.shape(name)
        if out is None:
            out = empty((stop - start, *shape[1:]), dtype)
        elif out.dtype != dtype or tuple(out.shape) != (stop - start, *shape[1:]) or \
                not out.is_contiguous():
            raise ConversionError(f"Internal error reading rows {start}:{stop} of '{name}' "
                                  f"({dtype}, {shape}) into a {out.dtype} {tuple(out.shape)}.")
        fd, position, _ = self.row_bytes(name, start, stop)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else b""
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], position + done)
            if n <= 0:
                raise ConversionError(f"{self.where}: tensor '{name}' is cut short (truncated "
                                      f"safetensors file).")
            done += n
        return out

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of tensor ``name``, or of all tensors."""
        entries = self._entries.values() if name is None else [self._entry(name)]
        return sum(math.prod(s) * d.itemsize for _, _, d, s in entries)

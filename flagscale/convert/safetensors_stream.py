"""Write sharded safetensors files one tensor at a time.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the raw bytes. Every shape is known before any tensor is produced, so each file's header is
written first and tensors are appended as they are produced: memory holds one tensor, not a shard.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator, Sequence

import torch

from flagscale.errors import ConversionError

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
                  tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write ``tensors`` (yielded in the planned order) into the planned shards and the
    ``model.safetensors.index.json``; returns the total bytes of tensor data."""
    names = shard_file_names(len(shards))
    weight_map, total = {}, 0
    element = torch.tensor([], dtype=dtype).element_size()
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
        with open(out_dir / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape in shard:
                got_name, tensor = next(tensors)
                if got_name != name or tuple(tensor.shape) != shape:
                    raise ConversionError(f"Internal ordering error writing {file_name}: expected "
                                          f"{name} {shape}, got {got_name} "
                                          f"{tuple(tensor.shape)}.")
                data = tensor.to(dtype).contiguous().view(torch.uint8)
                f.write(memoryview(data.numpy()))
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total

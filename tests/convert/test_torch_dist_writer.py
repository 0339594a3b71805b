"""The torch_dist writer: a chunk whose bytes are copied from other files gets the very archive
torch.save writes for that tensor."""

import io
import os

import torch

from flagscale.checkpoint.reader import CheckpointReader
from flagscale.convert.common import ZEROS, FileBytes
from flagscale.convert.torch_dist_writer import TorchDistWriter, _no_crc32


def test_a_chunk_copied_from_files_is_the_archive_torch_save_writes(tmp_path):
    tensor = torch.randn(2, 7, 5).to(torch.bfloat16)
    tensor[1, 5:] = 0  # rows no file gives (vocabulary padding)
    rows = tensor.view(-1, 5)
    source = tmp_path / "rows.bin"  # rows 7:12 first, then rows 0:7, after a 3-byte header
    source.write_bytes(b"hdr" + rows[7:12].view(torch.uint8).numpy().tobytes()
                       + rows[:7].view(torch.uint8).numpy().tobytes())
    row = 5 * tensor.element_size()
    fd = os.open(source, os.O_RDONLY)
    try:
        chunk = FileBytes(tuple(tensor.shape), ((fd, 3 + 5 * row, 7 * row), (fd, 3, 5 * row),
                                                (ZEROS, 0, 2 * row)), tensor.dtype)
        out = tmp_path / "ckpt"
        out.mkdir()
        with TorchDistWriter(out, files=1) as writer:
            writer.add_tensor("w", (4, 7, 5), (2, 0, 0), chunk)
            writer.finish({})
    finally:
        os.close(fd)
    expected = io.BytesIO()
    with _no_crc32():
        torch.save(tensor, expected)
    assert (out / "__0_0.distcp").read_bytes() == expected.getvalue()
    with CheckpointReader(out) as reader:
        assert torch.equal(reader.read({"w": ((2, 0, 0), (2, 7, 5))})["w"], tensor)

"""Input files of preprocessing: which files an input names, their format, and reading them as
ordered blocks of records.

Formats, from the file name:

- JSON lines: ``*.jsonl``, ``*.json``, ``*.ndjson``: one JSON object per line, text under a key;
- plain text: ``*.txt``, ``*.text``: one document per non-blank line;
- either of these compressed: ``.gz`` (gzip) or ``.zst`` (zstandard) appended, streamed; line
  numbers and byte offsets refer to the decompressed text;
- Parquet: ``*.parquet``: the text column (the same key), streamed one row group at a time.

An input is a file, a directory (every file of a known format below it, recursively) or a glob
pattern (``shards/*.jsonl.zst``, ``**`` allowed). Inputs keep the order they are given in; the
files of one directory or pattern come in sorted path order (Python's string order of the full
path), so the same corpus gives the same documents in the same order on every machine.

Records are located by ``(line, byte_offset)`` in line formats and ``(row_group, row)`` (0-based,
row within its row group) in Parquet.
"""

from __future__ import annotations

import glob
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from flagscale.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
PARQUET_SUFFIX = ".parquet"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
PARQUET_BATCH_ROWS = 1024
"""Rows per block of a Parquet row group: a fixed count, so blocks depend on the input alone."""


@dataclass(frozen=True)
class InputFile:
    """One input file and how to read it."""

    path: Path
    format: str
    """``json``, ``text`` or ``parquet``."""
    compression: Optional[str]
    """``gzip``, ``zstd`` or None."""


def input_format(path: str | Path) -> tuple[str, Optional[str]]:
    """(``"json"``, ``"text"`` or ``"parquet"``; compression or None) of a file, from its name."""
    name = Path(path).name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[:-len(suffix)]
    if name.endswith(JSON_SUFFIXES):
        return "json", compression
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(PARQUET_SUFFIX) and compression is None:
        return "parquet", None
    raise DataError(f"Input {path}: unknown format. Name it *.jsonl (one JSON object per line), "
                    f"*.txt (one document per line), optionally with .gz or .zst appended, or "
                    f"*.parquet (a text column).")


def _known(path: Path) -> bool:
    try:
        input_format(path)
    except DataError:
        return False
    return True


def expand_inputs(inputs) -> tuple[list[InputFile], list[str]]:
    """The input files ``inputs`` name, in order, and the files of unknown format that
    directories held (skipped: READMEs, checksums, .gitattributes of downloaded datasets).

    Raises DataError for a missing input, a pattern or directory without input files, and a file
    named directly (or matched by a pattern) whose format is unknown.
    """
    files, skipped = [], []
    kinds = "*.jsonl, *.txt, optionally .gz/.zst, *.parquet"
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file()), key=str)
            skipped += [str(p) for p in found if not _known(p)]
            matched = [p for p in found if _known(p)]
            if not matched:
                raise DataError(f"Directory {path} holds no input files ({kinds}). Check the "
                                f"path.")
        elif path.is_file():
            matched = [path]
        elif glob.has_magic(str(spec)):
            matched = sorted((Path(p) for p in glob.glob(str(spec), recursive=True)
                              if Path(p).is_file()), key=str)
            if not matched:
                raise DataError(f"Pattern {spec} matches no files. Check the path.")
        else:
            raise DataError(f"Input {spec} does not exist.")
        files += [InputFile(p, *input_format(p)) for p in matched]
    if not files:
        raise DataError("No input files given. Pass --input FILE|DIR|GLOB [...].")
    return files, skipped


def open_decompressed(path: str | Path, compression: Optional[str]) -> BinaryIO:
    """A binary stream of the decompressed bytes of ``path``."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        # Buffered so read(n) returns n bytes until the end and readline works.
        return io.BufferedReader(_ZstdStream(path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a zstd file of one or more frames. A file that ends inside a
    frame raises EOFError, as gzip does: zstandard's own stream_reader returns the bytes decoded
    so far without a word, which would make a truncated download look complete."""

    def __init__(self, path: str | Path):
        import zstandard

        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk = self._file.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            pieces = []
            while chunk:  # a chunk may finish one frame and start the next
                self._in_frame = True
                pieces.append(self._frame.decompress(chunk))
                if not self._frame.eof:
                    break
                chunk = self._frame.unused_data
                self._frame = self._decompressor.decompressobj()
                self._in_frame = False
            self._out = memoryview(b"".join(pieces))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _read_errors() -> tuple:
    """What reading a damaged file raises: I/O, truncation, gzip, zstandard and Arrow errors."""
    import pyarrow
    import zstandard

    return (OSError, EOFError, gzip.BadGzipFile, zstandard.ZstdError, pyarrow.ArrowException)


def read_line_blocks(index: int, file: InputFile, key: str,
                     block_bytes: int) -> Iterator[tuple]:
    """Tasks ``("lines", index, format, key, first_line, first_offset, data)`` of whole lines of a
    line-format file; a read failure ends the file with ``("unreadable", index, line, reason,
    detail)``, ``line`` being the first line not read."""
    line, offset, carry = 1, 0, []  # carry: pieces of a line longer than one block
    try:
        with open_decompressed(file.path, file.compression) as f:
            while block := f.read(block_bytes):
                cut = block.rfind(b"\n")
                if cut < 0:
                    carry.append(block)
                    continue
                data = b"".join(carry + [block[:cut + 1]])
                carry = [block[cut + 1:]]
                yield ("lines", index, file.format, key, line, offset, data)
                line += data.count(b"\n")
                offset += len(data)
    except _read_errors() as exc:
        yield ("unreadable", index, line, "unreadable file",
               f"cannot read it from line {line} on: {exc}; a truncated download?")
        return
    if any(carry):
        yield ("lines", index, file.format, key, line, offset, b"".join(carry))


def read_parquet_blocks(index: int, file: InputFile, key: str) -> Iterator[tuple]:
    """Tasks ``("parquet", index, key, row_group, first_row, texts)`` of a Parquet file's
    ``key`` column (``texts`` a pyarrow string array, cheap to send to a worker), row group by
    row group; an unreadable file or a missing or non-string column gives ``("unreadable", index,
    None, reason, detail)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file.path)
        schema = parquet.schema_arrow
        if key not in schema.names:
            yield ("unreadable", index, None, "missing key",
                   f"no column {key!r}; columns: {', '.join(schema.names[:8])}")
            return
        column_type = schema.field(key).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            yield ("unreadable", index, None, "non-string text",
                   f"column {key!r} is {column_type}")
            return
        for group in range(parquet.num_row_groups):
            row = 0
            for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, row_groups=[group],
                                              columns=[key], use_threads=False):
                yield ("parquet", index, key, group, row, batch.column(0))
                row += batch.num_rows
    except _read_errors() as exc:
        yield ("unreadable", index, None, "unreadable file", f"cannot read it: {exc}")


def read_tasks(index: int, file: InputFile, key: str, block_bytes: int) -> Iterator[tuple]:
    """The blocks of one input file, in record order (see the two readers)."""
    if file.format == "parquet":
        return read_parquet_blocks(index, file, key)
    return read_line_blocks(index, file, key, block_bytes)


def read_record(path: str | Path, compression: Optional[str], byte_offset: Optional[int] = None,
                row_group: Optional[int] = None, row: Optional[int] = None,
                key: str = "text") -> bytes:
    """The raw record at a location, read from the file now: the line at ``byte_offset`` (no
    newline) of a line-format file, or the UTF-8 text of ``row`` of ``row_group`` of a Parquet
    file. Raises DataError when the file is gone or too short."""
    try:
        if row_group is not None:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path).read_row_group(row_group, columns=[key])
            if row >= table.num_rows:
                raise DataError(f"{path}: row group {row_group} has {table.num_rows} rows, not "
                                f"row {row}: the file changed since the dataset was built.")
            return (table.column(0)[row].as_py() or "").encode("utf-8")
        with open_decompressed(path, compression) as f:
            remaining = byte_offset
            while remaining:  # compressed streams only seek by reading
                skipped = len(f.read(min(remaining, 1 << 20)))
                if not skipped:
                    break
                remaining -= skipped
            line = f.readline()
    except _read_errors() as exc:
        raise DataError(f"Cannot read {path} (byte {byte_offset}, row group {row_group}): "
                        f"{exc}. The source moved or changed since the dataset was built.") \
            from None
    if not line:
        raise DataError(f"{path} ends before byte {byte_offset}: it changed since the dataset "
                        f"was built.")
    return line.rstrip(b"\n")

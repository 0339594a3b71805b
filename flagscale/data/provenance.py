"""Provenance sidecar of an indexed dataset: where every document came from.

``flagscale preprocess`` writes two files beside ``PREFIX.bin``/``PREFIX.idx``:

- ``PREFIX.prov.npy``: one record per document, ``(source, line, byte_offset)`` as
  ``uint32, uint64, uint64``: the index of its source file, the 1-based line number of its record
  and the byte offset of that line's first byte (in the decompressed stream for ``.gz``/``.zst``
  inputs). For a Parquet source the two numbers are the record's row group and its row within
  that row group (both 0-based). Memory-mapped on read, so a lookup costs one page whatever the
  dataset size.
- ``PREFIX.prov.json``: the source files (path, format, size, sha256, documents), the tokenizer
  identity (kind, path, vocab size, eod, sha256), document and token counts, rejected counts.
  Written last: its presence marks a complete dataset.

    prov = Provenance.open("data/corpus")
    origin = prov.lookup(42)        # .source, .line, .byte_offset (or .row_group, .row: Parquet)
    check_dataset("data/corpus", tokenizer)    # DataError when missing or another tokenizer's
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from flagscale.errors import DataError

FORMAT = "flagscale-provenance"
VERSION = 1
RECORD_DTYPE = np.dtype([("source", "<u4"), ("line", "<u8"), ("byte_offset", "<u8")])


def prov_paths(prefix: str | Path) -> tuple[Path, Path]:
    """The (records .npy, metadata .json) paths of a dataset prefix."""
    prefix = str(prefix)
    return Path(prefix + ".prov.npy"), Path(prefix + ".prov.json")


@dataclass(frozen=True)
class Origin:
    """Where one document came from."""

    source: str
    """Path of the input file, as it was when the dataset was built."""
    line: Optional[int]
    """1-based line number of the document's record; None in Parquet."""
    byte_offset: Optional[int]
    """Offset of the record's first byte (decompressed offset for .gz/.zst); None in Parquet."""
    row_group: Optional[int] = None
    """Parquet: the record's row group (0-based); None in line formats."""
    row: Optional[int] = None
    """Parquet: the record's row within its row group (0-based); None in line formats."""

    def __iter__(self):
        return iter((self.source, self.line, self.byte_offset))

    def __str__(self) -> str:
        if self.row_group is not None:
            return f"{self.source} row group {self.row_group} row {self.row}"
        return f"{self.source}:{self.line} (byte {self.byte_offset})"


class Provenance:
    """Read-only view of a dataset's provenance; build one with :meth:`Provenance.open`."""

    def __init__(self, prefix: str, records: np.ndarray, meta: dict):
        self.prefix = prefix
        self.records = records
        self.meta = meta
        self.sources: list[dict] = meta["sources"]
        self.tokenizer: dict = meta["tokenizer"]

    @classmethod
    def open(cls, prefix: str | Path) -> "Provenance":
        """Open the sidecar of ``prefix``; DataError when it is missing, foreign or inconsistent."""
        npy, meta_path = prov_paths(prefix)
        if not meta_path.is_file() or not npy.is_file():
            raise DataError(f"Dataset {prefix} has no provenance sidecar ({meta_path.name}, "
                            f"{npy.name}): it was not built by `flagscale preprocess`, or that run "
                            f"did not finish. Re-run `flagscale preprocess --output-prefix "
                            f"{prefix} ...`.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            records = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"Provenance of {prefix} is unreadable ({exc}). Re-run "
                            f"`flagscale preprocess` for it.") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise DataError(f"{meta_path} is not a {FORMAT} v{VERSION} file (format "
                            f"{meta.get('format')!r}, version {meta.get('version')!r}). Re-run "
                            f"`flagscale preprocess` with this flagscale version.")
        if records.dtype != RECORD_DTYPE or len(records) != meta["documents"]:
            raise DataError(f"{npy} holds {len(records)} records of {records.dtype}, but "
                            f"{meta_path.name} says {meta['documents']} documents: the files come "
                            f"from different runs. Re-run `flagscale preprocess`.")
        return cls(str(prefix), records, meta)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def documents(self) -> int:
        """Number of documents in the dataset."""
        return int(self.meta["documents"])

    @property
    def tokens(self) -> int:
        """Number of tokens in the dataset, end-of-document tokens included."""
        return int(self.meta["tokens"])

    @property
    def tokenizer_vocab_size(self) -> int:
        """True vocabulary size of the tokenizer the dataset was built with."""
        return int(self.tokenizer["vocab_size"])

    def lookup(self, doc_id: int) -> Origin:
        """Source path and location (line and byte offset, or Parquet row group and row) of
        document ``doc_id``."""
        if not 0 <= doc_id < len(self.records):
            raise DataError(f"Document {doc_id} is out of range: dataset {self.prefix} has "
                            f"{len(self.records)} documents (0..{len(self.records) - 1}).")
        record = self.records[doc_id]
        source = self.sources[int(record["source"])]
        a, b = int(record["line"]), int(record["byte_offset"])
        if source["format"] == "parquet":
            return Origin(source["path"], None, None, a, b)
        return Origin(source["path"], a, b)

    def source_line(self, doc_id: int) -> bytes:
        """The raw record document ``doc_id`` was built from, read from its source file now: the
        line without its newline, or a Parquet row's text; DataError when the file is gone or
        too short."""
        from flagscale.data.sources import read_record

        origin = self.lookup(doc_id)
        source = self.sources[int(self.records[doc_id]["source"])]
        # Datasets written before zstd support record only a gzip flag.
        compression = source.get("compression", "gzip" if source.get("gzip") else None)
        return read_record(origin.source, compression, origin.byte_offset, origin.row_group,
                           origin.row, self.meta.get("json_key", "text"))

    def changed_sources(self) -> list[str]:
        """Paths of source files that are gone or whose size or sha256 differs from build time."""
        from flagscale.data.tokenizer import file_sha256

        changed = []
        for source in self.sources:
            path = Path(source["path"])
            if (not path.is_file() or path.stat().st_size != source["size"]
                    or file_sha256(path) != source["sha256"]):
                changed.append(source["path"])
        return changed


def check_dataset(prefix: str | Path, tokenizer=None) -> Provenance:
    """Check that ``prefix`` is a complete flagscale dataset built with ``tokenizer`` (a
    :class:`flagscale.data.tokenizer.Tokenizer`, or None to skip that check).

    Raises DataError naming the prefix and both tokenizers when it is missing, incomplete or was
    built with another tokenizer; returns its :class:`Provenance`.
    """
    prefix = str(prefix)
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not Path(p).is_file()]
    if missing:
        raise DataError(f"Dataset prefix {prefix}: {', '.join(missing)} not found. Check "
                        f"data.paths, or build it with `flagscale preprocess --input FILE "
                        f"--output-prefix {prefix} --tokenizer SPEC`.")
    prov = Provenance.open(prefix)
    _check_index(prefix, prov)
    if tokenizer is not None:
        _check_tokenizer(prefix, prov.tokenizer, tokenizer)
    return prov


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
"""Token bytes per dtype code of megatron-core's ``indexed_dataset.DType`` (uint8 = 1, ...,
uint16 = 8)."""


def check_index(prefix: str | Path) -> int:
    """Check that ``PREFIX.idx`` is whole and matches ``PREFIX.bin``; returns its sequence count.

    The .idx is a 34-byte header (9-byte magic, u64 version, u8 dtype code, u64 sequences S, u64
    documents D), then S int32 lengths, S int64 byte pointers, D int64 document indices and, for
    multimodal datasets, S int8 modes; the last sequence ends where the .bin does.
    """
    idx, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        header = f.read(34)
        if len(header) < 34 or header[:9] != _IDX_MAGIC or header[17] not in _IDX_ITEMSIZE:
            raise DataError(f"Dataset {prefix}: {idx} is not a megatron-core index (its header is "
                            f"cut or foreign). Re-run `flagscale preprocess` for it.")
        sequences, documents = struct.unpack("<QQ", header[18:34])
        base = 34 + 12 * sequences + 8 * documents
        if size not in (base, base + sequences):
            raise DataError(f"Dataset {prefix}: {idx} is {size} bytes, but its header's "
                            f"{sequences} sequences and {documents} document boundaries need "
                            f"{base}: the file is truncated or damaged. Re-run `flagscale "
                            f"preprocess --output-prefix {prefix} ...` for it.")
        end = 0
        if sequences:
            f.seek(34 + 4 * (sequences - 1))
            last_length = struct.unpack("<i", f.read(4))[0]
            f.seek(34 + 4 * sequences + 8 * (sequences - 1))
            end = struct.unpack("<q", f.read(8))[0] + last_length * _IDX_ITEMSIZE[header[17]]
    if bin_path.stat().st_size != end:
        raise DataError(f"Dataset {prefix}: {bin_path} is {bin_path.stat().st_size} bytes, but "
                        f"{idx} indexes {end}: one of them is truncated or from another run. "
                        f"Re-run `flagscale preprocess --output-prefix {prefix} ...` for it.")
    return sequences


def _check_index(prefix: str, prov: Provenance) -> None:
    sequences = check_index(prefix)
    itemsize = np.dtype(prov.meta["token_dtype"]).itemsize
    bin_size = Path(prefix + ".bin").stat().st_size
    if sequences != prov.documents or bin_size != prov.tokens * itemsize:
        raise DataError(f"Dataset {prefix}: .idx holds {sequences} sequences and .bin {bin_size} "
                        f"bytes, but its provenance records {prov.documents} documents of "
                        f"{prov.tokens} tokens ({prov.tokens * itemsize} bytes): the files come "
                        f"from different runs. Re-run `flagscale preprocess` for it.")


def _check_tokenizer(prefix: str, built: dict, tokenizer) -> None:
    rebuild = (f"Re-run `flagscale preprocess --output-prefix {prefix} --tokenizer "
               f"{tokenizer.path}`, or set data.tokenizer to {built['path']}.")
    if built["vocab_size"] != tokenizer.vocab_size:
        raise DataError(f"Dataset {prefix} was built with tokenizer {built['path']} (vocab size "
                        f"{built['vocab_size']}), but training uses {tokenizer.path} (vocab size "
                        f"{tokenizer.vocab_size}). {rebuild}")
    if built["sha256"] != tokenizer.fingerprint or built["eod"] != tokenizer.eod:
        raise DataError(f"Dataset {prefix} was built with tokenizer {built['path']} (sha256 "
                        f"{built['sha256'][:12]}, eod {built['eod']}), but training uses "
                        f"{tokenizer.path} (sha256 {tokenizer.fingerprint[:12]}, eod "
                        f"{tokenizer.eod}): same vocab size, different tokenizer. {rebuild}")


def write_provenance(prefix: str | Path, records: np.ndarray, meta: dict,
                     suffix: str) -> tuple[Path, Path]:
    """Write the sidecar of ``prefix`` under temporary names ending in ``suffix``; returns the
    temporary (records, meta) paths for the caller to rename once every output is complete."""
    npy, meta_path = prov_paths(prefix)
    tmp_npy, tmp_meta = Path(str(npy) + suffix), Path(str(meta_path) + suffix)
    with open(tmp_npy, "wb") as f:
        np.save(f, np.ascontiguousarray(records, dtype=RECORD_DTYPE))
    full = {"format": FORMAT, "version": VERSION, **meta}
    tmp_meta.write_text(json.dumps(full, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return tmp_npy, tmp_meta


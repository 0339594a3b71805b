"""Rebuild the provenance sidecar of a dataset written without one, e.g. by Megatron-LM's
``tools/preprocess_data.py`` (megatron-core's ``IndexedDatasetBuilder``), from its original input
files, verifying every document.

    result = index_provenance("data/pile_text_document", ["pile/00.jsonl"], tokenizer, workers=8)

The inputs are read and tokenized exactly as :func:`flagscale.data.preprocess.preprocess` does
(same formats, order and rejected records), and each document's tokens (its text's tokens and
the end-of-document id) must equal the dataset's document of the same index, token for token. The
first mismatch stops the run with a DataError naming the document, its input record and what to
check. When all match, the sidecar written is the one ``flagscale preprocess`` writes for those
inputs (the same ``PREFIX.prov.npy`` bytes and ``PREFIX.prov.json``), so training checks the
tokenizer and traces name file and line. An existing sidecar is replaced only with ``force``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from flagscale.data.preprocess import (BLOCK_BYTES, RECORD_DTYPE, SHOWN_REJECTIONS,
                                       PreprocessResult, Progress, block_bytes_read,
                                       block_records, block_rejections, encoded_blocks,
                                       source_entries)
from flagscale.data.provenance import check_index, prov_paths, write_provenance
from flagscale.data.sources import expand_inputs
from flagscale.data.tokenizer import Tokenizer
from flagscale.errors import DataError

_CHECK = ("Check that --tokenizer is the one the dataset was built with, that it was built "
          "with --append-eod, --json-key, and that --input lists the files in the order they "
          "were given to preprocess_data.py")


def index_provenance(prefix: str | Path, inputs: Sequence[str | Path], tokenizer: Tokenizer,
                     workers: int = 1, json_key: str = "text", force: bool = False,
                     progress: bool = False,
                     block_bytes: int = BLOCK_BYTES) -> PreprocessResult:
    """Verify dataset ``prefix`` against ``inputs`` re-tokenized with ``tokenizer`` and write its
    provenance sidecar; ``result.outputs`` are the two sidecar files."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    started = time.perf_counter()
    prefix = str(prefix)
    finals = prov_paths(prefix)
    present = [str(p) for p in finals if p.exists()]
    if present and not force:
        raise DataError(f"Dataset {prefix} already has a provenance sidecar ({', '.join(present)})"
                        f"; it is never replaced without --force. Pass --force to rebuild it.")
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not Path(p).is_file()]
    if missing:
        raise DataError(f"Dataset prefix {prefix}: {', '.join(missing)} not found. Pass the "
                        f"prefix without .bin/.idx (Megatron-LM names it "
                        f"OUTPUT_PREFIX_text_document).")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}.")
    files, _ = expand_inputs(inputs)
    check_index(prefix)
    dataset = IndexedDataset(prefix)
    stored = _Stored(prefix, dataset)
    sources = source_entries(files)
    result = PreprocessResult(prefix, 0, 0, 0, 0.0, outputs=[str(p) for p in finals])
    bar = Progress(progress, None, started, "index-provenance")
    records = []
    try:
        for task, (tokens, lengths, where_a, where_b, rejected) in encoded_blocks(
                files, tokenizer, workers, json_key, block_bytes):
            index = task[1]
            block = block_records(index, lengths, where_a, where_b)
            stored.verify(result.documents, tokens, lengths, block, files, tokenizer)
            for rejection in block_rejections(task, str(files[index].path), rejected):
                result.rejected[rejection.reason] += 1
                if len(result.first_rejections) < SHOWN_REJECTIONS:
                    result.first_rejections.append(rejection)
            records.append(block)
            sources[index]["documents"] += len(lengths)
            result.documents += len(lengths)
            result.tokens += int(tokens.size)
            read = block_bytes_read(task)
            result.input_bytes += read
            bar.update(read, result.documents, result.tokens)
    finally:
        bar.close()
    if result.documents < stored.count:
        raise DataError(f"Dataset {prefix} holds {stored.count:,} documents, but its inputs give "
                        f"only {result.documents:,} ({result.tokens:,} tokens, all matching): "
                        f"input files are missing from --input. {_CHECK}.")
    meta = {"documents": result.documents, "tokens": result.tokens,
            "token_dtype": np.dtype(stored.dtype).name, "json_key": json_key,
            "sources": sources, "tokenizer": tokenizer.identity(),
            "rejected": dict(sorted(result.rejected.items()))}
    temps = write_provenance(prefix, np.concatenate(records or [np.empty(0, RECORD_DTYPE)]),
                             meta, f".tmp{os.getpid()}")
    if finals[1].exists():  # --force: no moment where the old metadata vouches for new records
        finals[1].unlink()
    for temp, final in zip(temps, finals):
        os.replace(temp, final)
    result.seconds = time.perf_counter() - started
    return result


class _Stored:
    """The tokens of a megatron-core indexed dataset, compared block by block with the inputs."""

    def __init__(self, prefix: str, dataset):
        self.prefix = prefix
        self.dtype = dataset.index.dtype
        self.lengths = dataset.sequence_lengths
        self.count = len(self.lengths)
        boundaries = np.diff(dataset.document_indices)
        if (boundaries > 1).any():
            doc = int(np.argmax(boundaries > 1))
            raise DataError(f"Dataset {prefix}: document {doc} has {int(boundaries[doc])} "
                            f"sequences (preprocess_data.py --split-sentences). flagscale "
                            f"datasets hold one sequence per document; re-run `flagscale "
                            f"preprocess` on the inputs instead.")
        itemsize = np.dtype(self.dtype).itemsize
        starts = np.concatenate(([0], np.cumsum(self.lengths[:-1], dtype=np.int64))) * itemsize
        if not np.array_equal(starts, dataset.index.sequence_pointers):
            raise DataError(f"Dataset {prefix}: its documents are not stored back to back in "
                            f"{prefix}.bin, as IndexedDatasetBuilder writes them. Re-run "
                            f"`flagscale preprocess` on the inputs instead.")
        self.tokens = (np.memmap(prefix + ".bin", dtype=self.dtype, mode="r")
                       if self.count else np.empty(0, self.dtype))
        self.offset = 0

    def verify(self, first: int, tokens: np.ndarray, lengths: np.ndarray, records: np.ndarray,
               files, tokenizer: Tokenizer) -> None:
        """Check documents ``first..first+len(lengths)`` against one encoded block; DataError at
        the first document that differs."""
        end = self.offset + tokens.size
        if (np.array_equal(lengths, self.lengths[first:first + len(lengths)])
                and np.array_equal(tokens, self.tokens[self.offset:end])):
            self.offset = end
            return
        ends = np.cumsum(lengths)
        for j, length in enumerate(lengths):
            doc = first + j
            ours = tokens[ends[j] - length:ends[j]].tolist()
            where = _where(files[int(records[j]["source"])], records[j])
            if doc >= self.count:
                raise DataError(f"Dataset {self.prefix} holds {self.count:,} documents, but its "
                                f"inputs give more: document {doc} would come from {where}. "
                                f"{_CHECK}.")
            start = self.offset + int(ends[j] - length)
            theirs = self.tokens[start:start + int(self.lengths[doc])].tolist()
            if ours != theirs:
                raise DataError(f"Document {doc} of dataset {self.prefix} does not match its "
                                f"input record {where} re-tokenized: the dataset holds "
                                f"{len(theirs)} tokens {_head(theirs)}, the input gives "
                                f"{len(ours)} tokens {_head(ours)}. "
                                f"{_diagnose(ours, theirs, tokenizer)}.")
        raise AssertionError("a differing block has a differing document")


def _where(file, record) -> str:
    if file.format == "parquet":
        return f"{file.path} row group {int(record['line'])} row {int(record['byte_offset'])}"
    return f"{file.path}:{int(record['line'])}"


def _head(ids: list, shown: int = 8) -> str:
    return "[" + ", ".join(map(str, ids[:shown])) + (", ...]" if len(ids) > shown else "]")


def _diagnose(ours: list, theirs: list, tokenizer: Tokenizer) -> str:
    """The likely cause of a mismatch, from how the two token lists differ."""
    if theirs == ours[:-1]:
        return (f"The dataset's document lacks the end-of-document id {tokenizer.eod}: it was "
                f"built without --append-eod, and flagscale documents end with it. Rebuild the "
                f"dataset with `flagscale preprocess` instead")
    if tokenizer.bos is not None and theirs[:1] == [tokenizer.bos] and theirs[1:] == ours:
        return (f"The dataset's document starts with the begin-of-text id {tokenizer.bos} (its "
                f"tokenizer added special tokens, as Megatron-LM's HuggingFaceTokenizer does), "
                f"and flagscale documents do not. Rebuild the dataset with `flagscale "
                f"preprocess` instead")
    return _CHECK

"""Tokenize text files into a megatron-core indexed dataset with a provenance sidecar.

    result = preprocess(["a.jsonl", "shards/", "web/*.parquet"], "data/mix",
                        load_tokenizer("tok.model"), workers=4)

Inputs (:mod:`flagscale.data.sources`): JSON lines, plain text, either gzip- or zstd-compressed,
and Parquet; files, directories and glob patterns, in the order given, the files of a directory or
pattern in sorted path order. In line formats the document is a JSON object's ``json_key`` or a
non-blank text line (a trailing ``\\r`` dropped); in Parquet it is the ``json_key`` column's value.
Blank lines are not records and are skipped. Every other record that yields no document (invalid
UTF-8, invalid JSON, not an object, missing or non-string key, empty or null text) is a rejection,
and so is a file that cannot be read (a truncated download: the records before the damage are
kept): counted by reason, written to ``PREFIX.rejected.jsonl``, or a DataError under ``strict``.

Each document is its tokens plus the tokenizer's end-of-document id, stored as one sequence of one
document in ``PREFIX.bin``/``.idx`` (uint16 when the vocabulary has fewer than 65500 ids).

Speed and determinism: the main process reads fixed-size blocks of whole lines (or fixed row
counts of Parquet row groups) and hands them to a pool of workers that decode, parse and tokenize
them; results come back in block order and the main process only writes. Blocks depend on the
input bytes alone, never on the worker count, so the output is byte-identical for any
``workers``. At most ``4 * workers`` blocks are in flight, so memory stays bounded for inputs of
any size. Each worker runs its tokenizer on one thread: ``workers`` is the number of cores used
(a tokenizer library's own thread pool in every worker would put workers x cores threads on the
cores).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from flagscale.data.provenance import RECORD_DTYPE, prov_paths, write_provenance
from flagscale.data.sources import expand_inputs, read_tasks
from flagscale.data.tokenizer import Tokenizer, file_sha256
from flagscale.errors import DataError

BLOCK_BYTES = 256 * 1024
SHOWN_REJECTIONS = 5


@dataclass
class Rejection:
    """One input record (line, Parquet row) or file that produced no document."""

    source: str
    line: Optional[int]
    """1-based line (line formats); for an unreadable file, the first line not read."""
    byte_offset: Optional[int]
    reason: str
    """Category, counted in the summary: ``invalid UTF-8``, ``invalid JSON``, ``not a JSON
    object``, ``missing key``, ``non-string text``, ``empty text``, ``null text``,
    ``unreadable file``."""
    detail: str
    row_group: Optional[int] = None
    """Parquet: the record's row group (0-based)."""
    row: Optional[int] = None
    """Parquet: the record's row within its row group (0-based)."""

    def where(self) -> str:
        """``file:line``, ``file row group G row R``, or the file alone."""
        if self.row is not None:
            return f"{self.source} row group {self.row_group} row {self.row}"
        if self.byte_offset is not None:
            return f"{self.source}:{self.line}"
        return self.source

    def to_json(self) -> dict:
        """The object written to PREFIX.rejected.jsonl (Parquet keys only for Parquet rows)."""
        record = {"source": self.source, "line": self.line, "byte_offset": self.byte_offset,
                  "reason": self.reason, "detail": self.detail}
        if self.row is not None:
            record.update(row_group=self.row_group, row=self.row)
        return record

    def __str__(self) -> str:
        if self.reason == "unreadable file":  # its detail says what could not be read
            return f"{self.source}: {self.detail}"
        return f"{self.where()}: {self.reason} ({self.detail})"


@dataclass
class PreprocessResult:
    """What a preprocessing run produced."""

    prefix: str
    documents: int
    tokens: int
    input_bytes: int
    """Bytes of input read: decompressed for .gz/.zst, the text column's bytes for Parquet."""
    seconds: float
    rejected: Counter = field(default_factory=Counter)
    """Rejected records (and unreadable files) by reason."""
    first_rejections: list = field(default_factory=list)
    """The first few :class:`Rejection` objects, in input order."""
    outputs: list = field(default_factory=list)
    skipped_files: list = field(default_factory=list)
    """Files of unknown format found in input directories, not read."""

    def summary(self) -> str:
        """One line with the numbers a user wants."""
        rate = self.tokens / max(self.seconds, 1e-9)
        mbs = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items()))
        return (f"{self.documents:,} documents, {self.tokens:,} tokens from "
                f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.1f} s ({rate:,.0f} tokens/s, "
                f"{mbs:.2f} MB/s); {rejected:,} records rejected{f' ({reasons})' if reasons else ''}"
                f" -> {self.prefix}.bin/.idx")


# ---- worker side: decode, parse and tokenize one block of records -------------------------------

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    # One thread per worker (module docstring). The variable is read at each batch call by HF
    # tokenizers; sentencepiece is called with num_threads=1 and tiktoken one text at a time.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Under fork the tokenizer arrives as the parent's object, already loaded (a 128K-vocabulary
    # tokenizer.json takes a second to load); under spawn it arrives pickled.
    _worker_tokenizer = tokenizer


def _parse_line(raw: bytes, fmt: str, json_key: str) -> tuple[Optional[str], Optional[tuple]]:
    """(document text, None) or (None, (reason, detail)); (None, None) for a blank line."""
    if not raw.strip():
        return None, None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("invalid UTF-8", f"byte {exc.start}: {raw[exc.start:exc.start + 4]!r}")
    if fmt == "text":
        return line[:-1] if line.endswith("\r") else line, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, ("invalid JSON", f"{exc.msg} at column {exc.colno}")
    if not isinstance(record, dict):
        return None, ("not a JSON object", f"got {type(record).__name__}")
    if json_key not in record:
        keys = ", ".join(list(record)[:5]) or "none"
        return None, ("missing key", f"no {json_key!r}; keys: {keys}")
    text = record[json_key]
    if not isinstance(text, str):
        return None, ("non-string text", f"{json_key!r} is {type(text).__name__}")
    if not text.strip():
        return None, ("empty text", f"{json_key!r} is {text!r}")
    return text, None


def _parse_lines(task: tuple) -> tuple[list, list, list, list]:
    """Texts, lines, byte offsets and rejections ``(line, offset, reason, detail)`` of a block."""
    _, _, fmt, json_key, first_line, offset, data = task
    texts, lines, offsets, rejections = [], [], [], []
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    if first_line == 1 and raw_lines and raw_lines[0].startswith(b"\xef\xbb\xbf"):
        # A UTF-8 byte-order mark is an encoding marker, not text.
        raw_lines[0] = raw_lines[0][3:]
        offset += 3
    for number, raw in enumerate(raw_lines, first_line):
        text, rejection = _parse_line(raw, fmt, json_key)
        if text is not None:
            texts.append(text)
            lines.append(number)
            offsets.append(offset)
        elif rejection is not None:
            rejections.append((number, offset) + rejection)
        offset += len(raw) + 1
    return texts, lines, offsets, rejections


def _parse_rows(task: tuple) -> tuple[list, list, list, list]:
    """Texts, row groups, rows and rejections ``(row_group, row, reason, detail)`` of a block of
    Parquet rows."""
    _, _, json_key, group, first_row, column = task
    texts, rows, rejections = [], [], []
    for row, text in enumerate(column.to_pylist(), first_row):
        if text is None:
            rejections.append((group, row, "null text", f"{json_key!r} is null"))
        elif not text.strip():
            rejections.append((group, row, "empty text", f"{json_key!r} is {text!r}"))
        else:
            texts.append(text)
            rows.append(row)
    return texts, [group] * len(rows), rows, rejections


def encode_block(task: tuple, tokenizer: Optional[Tokenizer] = None) -> tuple:
    """Tokenize one block (a task of :mod:`flagscale.data.sources`) -> ``(tokens, lengths,
    where_a, where_b, rejections)``: tokens include each document's eod; ``where`` is (line, byte
    offset) or (row group, row) per document, as in the provenance records."""
    tok = tokenizer or _worker_tokenizer
    kind = task[0]
    if kind == "lines":
        texts, where_a, where_b, rejections = _parse_lines(task)
    elif kind == "parquet":
        texts, where_a, where_b, rejections = _parse_rows(task)
    else:  # "unreadable": the file's failure, reported in its place in the order
        texts, where_a, where_b, rejections = [], [], [], [(task[2], None) + task[3:]]
    eod = tok.eod
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int32)
    # One flat list, one conversion: per-document arrays would cost a numpy call per document.
    for i, ids in enumerate(tok.encode_batch(texts)):
        flat += ids
        flat.append(eod)
        lengths[i] = len(ids) + 1
    tokens = np.array(flat, dtype=token_dtype(tok.vocab_size))
    return (tokens, lengths, np.asarray(where_a, dtype=np.uint64),
            np.asarray(where_b, dtype=np.uint64), rejections)


def token_dtype(vocab_size: int):
    """The .bin token dtype megatron-core picks for this vocabulary (uint16 below 65500)."""
    return np.uint16 if vocab_size < 65500 else np.int32


# ---- main side: read blocks, dispatch in order, write ------------------------------------------

def pool_context():
    """The multiprocessing context of the tokenizing workers: fork where the platform has it.

    Fork starts workers instantly; spawn would re-import the caller's main module (often torch and
    megatron-core: seconds per worker). The pool is started before any thread of ours (the
    progress bar's monitor) exists, as torch's DataLoader does with its fork workers.
    """
    return multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _ordered_results(tasks: Iterator[tuple], tokenizer: Tokenizer, workers: int) -> Iterator:
    """encode_block over ``tasks`` in order: in-process for one worker, else a bounded pool."""
    if workers <= 1:
        for task in tasks:
            yield task, encode_block(task, tokenizer)
        return
    with pool_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(encode_block, (task,))))
            if len(pending) >= 4 * workers:
                head, result = pending.popleft()
                yield head, result.get()
        while pending:
            head, result = pending.popleft()
            yield head, result.get()


def _block_bytes(task: tuple) -> int:
    """Input bytes a block stands for: its decompressed lines, or its Parquet text bytes."""
    if task[0] == "lines":
        return len(task[-1])
    if task[0] == "parquet":
        import pyarrow.compute as pc

        return int(pc.sum(pc.binary_length(task[-1])).as_py() or 0)
    return 0


def _add_documents(builder, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Append ``len(lengths)`` single-sequence documents, stored back to back in ``tokens``, to
    megatron-core's IndexedDatasetBuilder with one write: its per-document add_document would
    spend main-process CPU that the tokenizing workers need. Same state as add_document per
    document (one sequence length and one document boundary each)."""
    builder.data_file.write(tokens.astype(builder.dtype, copy=False).tobytes(order="C"))
    start = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(start + 1, start + 1 + len(lengths)))


def output_paths(prefix: str | Path) -> list[str]:
    """Every file :func:`preprocess` writes for ``prefix``."""
    prefix = str(prefix)
    return [prefix + ".bin", prefix + ".idx", prefix + ".rejected.jsonl",
            *map(str, prov_paths(prefix))]


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, tokenizer: Tokenizer,
               workers: int = 1, json_key: str = "text", strict: bool = False,
               progress: bool = False, block_bytes: int = BLOCK_BYTES) -> PreprocessResult:
    """Tokenize ``inputs`` (files, directories, glob patterns; see :mod:`flagscale.data.sources`)
    into ``PREFIX.bin``/``.idx`` with provenance sidecar ``PREFIX.prov.npy``/``.prov.json`` and
    ``PREFIX.rejected.jsonl``.

    Every output is written under a temporary name and renamed only when all are complete, the
    provenance metadata last. Raises DataError for missing inputs, for the first rejected record
    or unreadable file when ``strict``, and when no document survives.
    """
    # megatron-core's first import takes seconds: keep it out of the throughput figures.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    files, skipped = expand_inputs(inputs)
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}.")
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{os.getpid()}"
    finals = output_paths(prefix)
    temps = [f + suffix for f in finals]
    sources = [{"path": str(f.path.resolve()), "format": f.format,
                "compression": f.compression, "size": f.path.stat().st_size,
                "sha256": file_sha256(f.path), "documents": 0}
               for f in files]
    dtype = token_dtype(tokenizer.vocab_size)
    result = PreprocessResult(prefix, 0, 0, 0, 0.0, outputs=finals, skipped_files=skipped)
    tasks = (task for index, file in enumerate(files)
             for task in read_tasks(index, file, json_key, block_bytes))
    # Decompressed sizes are unknown up front: with compressed or Parquet inputs the bar shows
    # no percentage.
    plain = all(f.compression is None and f.format != "parquet" for f in files)
    total = sum(s["size"] for s in sources) if plain else None
    bar = None
    records = []
    builder = None
    try:
        builder = IndexedDatasetBuilder(temps[0], dtype=dtype)
        with open(temps[2], "w", encoding="utf-8") as rejected_file:
            for task, (tokens, lengths, where_a, where_b, rejections) in _ordered_results(
                    tasks, tokenizer, workers):
                index = task[1]
                source = str(files[index].path)
                for a, b, reason, detail in rejections:
                    rejection = (Rejection(source, None, None, reason, detail, a, b)
                                 if task[0] == "parquet" else
                                 Rejection(source, a, b, reason, detail))
                    if strict:
                        raise DataError(f"{rejection}. --strict stops at the first rejected "
                                        f"record; fix it or drop --strict to skip such records.")
                    result.rejected[reason] += 1
                    if len(result.first_rejections) < SHOWN_REJECTIONS:
                        result.first_rejections.append(rejection)
                    rejected_file.write(json.dumps(rejection.to_json(), ensure_ascii=False)
                                        + "\n")
                _add_documents(builder, tokens, lengths)
                block = np.empty(len(lengths), dtype=RECORD_DTYPE)
                block["source"], block["line"], block["byte_offset"] = index, where_a, where_b
                records.append(block)
                sources[index]["documents"] += len(lengths)
                result.documents += len(lengths)
                result.tokens += int(tokens.size)
                read = _block_bytes(task)
                result.input_bytes += read
                if progress:
                    if bar is None:  # created only now that the worker pool exists
                        from tqdm import tqdm
                        bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess",
                                   mininterval=0.5, dynamic_ncols=True)
                    bar.update(read)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(docs=f"{result.documents:,}",
                                    tokens=f"{result.tokens:,}",
                                    tok_s=f"{result.tokens / elapsed:,.0f}", refresh=False)
        builder.finalize(temps[1])
        if result.documents == 0:
            shown = "; ".join(map(str, result.first_rejections)) or "every line is blank"
            raise DataError(f"No documents in {', '.join(str(f.path) for f in files)}: {shown}. "
                            f"Check --json-key (now {json_key!r}) and the input format.")
        meta = {"documents": result.documents, "tokens": result.tokens,
                "token_dtype": np.dtype(dtype).name, "json_key": json_key,
                "sources": sources, "tokenizer": tokenizer.identity(),
                "rejected": dict(sorted(result.rejected.items()))}
        write_provenance(prefix, np.concatenate(records), meta, suffix)
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    finally:
        if bar is not None:
            bar.close()
        if builder is not None:
            builder.data_file.close()  # already closed by finalize on success
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
    result.seconds = time.perf_counter() - started
    return result

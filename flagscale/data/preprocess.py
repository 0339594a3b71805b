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

Resumable: every input file is a shard, and shards complete in input order in ``PREFIX.work/``
(the run's arguments in its ``manifest.json``): tokens are appended to one ``tokens.bin`` (never
copied again: it becomes ``PREFIX.bin``), and a shard's document lengths, provenance records,
rejections and a marker saying where its tokens end are written once its last block is. The
other outputs are the shards' parts concatenated in input order, after which the directory is
removed. A run killed part-way and rerun with the same arguments cuts ``tokens.bin`` back to the
last complete shard, tokenizes only the files after it and writes the same bytes as an
uninterrupted run; other arguments are refused, naming what changed.

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

import array
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from flagscale.data.provenance import RECORD_DTYPE, prov_paths, write_provenance
from flagscale.data.sources import InputFile, expand_inputs, read_tasks
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
    resumed_files: int = 0
    """Input files whose complete shards an interrupted earlier run left in ``PREFIX.work/``."""

    def summary(self) -> str:
        """One line with the numbers a user wants."""
        rate = self.tokens / max(self.seconds, 1e-9)
        mbs = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items()))
        resumed = (f"; {self.resumed_files:,} input files resumed from an interrupted run"
                   if self.resumed_files else "")
        return (f"{self.documents:,} documents, {self.tokens:,} tokens from "
                f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.1f} s ({rate:,.0f} tokens/s, "
                f"{mbs:.2f} MB/s); {rejected:,} records rejected{f' ({reasons})' if reasons else ''}"
                f"{resumed} -> {self.prefix}.bin/.idx")


# ---- worker side: decode, parse and tokenize one block of records -------------------------------

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    # One thread per worker (module docstring): sentencepiece is called with num_threads=1 and
    # tiktoken one text at a time. HF tokenizers gets a rayon pool of one thread (created at its
    # first batch call in this process) rather than its serial path: the same ids for about 20%
    # less CPU with a 128K-vocabulary BPE, measured in this pool. Were the parent's pool already
    # started before the fork, tokenizers itself falls back to its serial path.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = "1"
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
    # One C-int array for the block: extending it converts each id in C, where a flat Python
    # list would write every id object's reference count (a cache miss per token, 5% of a
    # 128K-vocabulary BPE's encoding time), and numpy takes it without a copy.
    flat = array.array("i")
    lengths = []
    for ids in tok.encode_batch(texts):
        flat.extend(ids)
        flat.append(eod)
        lengths.append(len(ids) + 1)
    tokens = np.frombuffer(flat, dtype=np.intc).astype(token_dtype(tok.vocab_size), copy=False)
    return (tokens, np.array(lengths, dtype=np.int32), np.asarray(where_a, dtype=np.uint64),
            np.asarray(where_b, dtype=np.uint64), rejections)


def token_dtype(vocab_size: int):
    """The .bin token dtype megatron-core picks for this vocabulary (uint16 below 65500)."""
    return np.uint16 if vocab_size < 65500 else np.int32


# ---- main side: read blocks, dispatch in order, write ------------------------------------------

def pool_context():
    """The multiprocessing context of the tokenizing workers: fork where the platform has it.

    Fork starts workers instantly; spawn would re-import the caller's main module (often torch and
    megatron-core: seconds per worker). The pool is started before any thread of ours (the
    progress bar's monitor) exists, as torch's DataLoader does with its fork workers. A process
    that has already run the HF tokenizers library's own thread pool (a parallel
    ``encode_batch``, training a tokenizer) forks workers that encode on that library's serial
    path, about 20% slower with a 128K BPE (measured): call :func:`preprocess` from a fresh
    process, as ``flagscale preprocess`` is.
    """
    return multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


_DRAIN_SECONDS = 60.0
"""How long a pool being shut down early waits for each block in flight."""


def _ordered_results(tasks: Iterator[tuple], tokenizer: Tokenizer, workers: int) -> Iterator:
    """encode_block over ``tasks`` in order: in-process for one worker, else a bounded pool."""
    if workers <= 1:
        for task in tasks:
            yield task, encode_block(task, tokenizer)
        return
    with pool_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append((task, pool.apply_async(encode_block, (task,))))
                if len(pending) >= 4 * workers:
                    head, result = pending.popleft()
                    yield head, result.get()
            while pending:
                head, result = pending.popleft()
                yield head, result.get()
        except (Exception, GeneratorExit):
            # Left early (a rejected record under --strict, a provenance mismatch): let the few
            # blocks in flight finish before the pool's terminate() kills its workers. A worker
            # killed while sending its result keeps the result queue's lock, and the pool's own
            # shutdown then waits for that lock forever (seen in the test suite). Bounded, in
            # case a worker died with its block.
            for _, result in pending:
                result.wait(timeout=_DRAIN_SECONDS)
            raise


def encoded_blocks(files: Sequence[InputFile], tokenizer: Tokenizer, workers: int,
                   json_key: str, block_bytes: int, first: int = 0) -> Iterator:
    """``(task, encode_block result)`` for every block of ``files[first:]`` in input order."""
    tasks = (task for index, file in enumerate(files[first:], first)
             for task in read_tasks(index, file, json_key, block_bytes))
    return _ordered_results(tasks, tokenizer, workers)


def block_rejections(task: tuple, source: str, rejections: list) -> list[Rejection]:
    """The :class:`Rejection` objects of one block's ``(a, b, reason, detail)`` tuples."""
    if task[0] == "parquet":
        return [Rejection(source, None, None, reason, detail, a, b)
                for a, b, reason, detail in rejections]
    return [Rejection(source, a, b, reason, detail) for a, b, reason, detail in rejections]


def block_records(index: int, lengths: np.ndarray, where_a: np.ndarray,
                  where_b: np.ndarray) -> np.ndarray:
    """The provenance records of one block's documents, all from input file ``index``."""
    records = np.empty(len(lengths), dtype=RECORD_DTYPE)
    records["source"], records["line"], records["byte_offset"] = index, where_a, where_b
    return records


def block_bytes_read(task: tuple) -> int:
    """Input bytes a block stands for: its decompressed lines, or its Parquet text bytes."""
    if task[0] == "lines":
        return len(task[-1])
    if task[0] == "parquet":
        import pyarrow.compute as pc

        return int(pc.sum(pc.binary_length(task[-1])).as_py() or 0)
    return 0


def source_entries(files: Sequence[InputFile]) -> list[dict]:
    """The provenance metadata of each input file (documents counted later)."""
    return [{"path": str(f.path.resolve()), "format": f.format, "compression": f.compression,
             "size": f.path.stat().st_size, "sha256": file_sha256(f.path), "documents": 0}
            for f in files]


class Progress:
    """A tqdm bar of input bytes with documents, tokens and tokens/s; does nothing when
    disabled. The bar is created at the first update, once the worker pool exists (see
    :func:`pool_context`)."""

    def __init__(self, enabled: bool, total: Optional[int], started: float, desc: str,
                 initial: int = 0):
        self.enabled, self.total, self.started, self.desc = enabled, total, started, desc
        self.initial = initial
        self.bar = None

    def update(self, read: int, documents: int, tokens: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, unit="B", unit_scale=True,
                            desc=self.desc, mininterval=0.5, dynamic_ncols=True)
        self.bar.update(read)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(docs=f"{documents:,}", tokens=f"{tokens:,}",
                             tok_s=f"{tokens / elapsed:,.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_index(builder, lengths: np.ndarray) -> None:
    """Append the index entries of ``len(lengths)`` single-sequence documents, whose tokens are
    already in the run's ``tokens.bin``, to megatron-core's IndexedDatasetBuilder: the same state
    as add_document per document (one sequence length and one document boundary each), without
    writing their tokens again."""
    start = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(start + 1, start + 1 + len(lengths)))


def output_paths(prefix: str | Path) -> list[str]:
    """Every file :func:`preprocess` writes for ``prefix``."""
    prefix = str(prefix)
    return [prefix + ".bin", prefix + ".idx", prefix + ".rejected.jsonl",
            *map(str, prov_paths(prefix))]


# ---- resumable runs: one complete shard per input file in PREFIX.work/ -------------------------

WORK_FORMAT = "flagscale-preprocess-work"
_SHARD_FILES = (".lengths.npy", ".prov.npy", ".rejected.jsonl", ".json")
"""What one shard (input file) leaves in the work directory besides its tokens, which go straight
into the run's one ``tokens.bin``; the .json, renamed last, marks it complete and records where
its tokens end in ``tokens.bin``."""


def work_dir(prefix: str | Path) -> Path:
    """The directory beside the outputs where a run keeps its completed shards until the end."""
    return Path(str(prefix) + ".work")


def _manifest_difference(old: dict, new: dict) -> Optional[str]:
    """What differs between the arguments of the run that left a work directory and this one."""
    if old.get("format") != WORK_FORMAT:
        return f"it is not a {WORK_FORMAT} directory"
    then, now = old["tokenizer"], new["tokenizer"]
    if then != now:
        return (f"the tokenizer was {then['path']} (sha256 {then['sha256'][:12]}), now "
                f"{now['path']} (sha256 {now['sha256'][:12]})")
    for key in ("json_key", "strict"):
        if old[key] != new[key]:
            return f"{key} was {old[key]!r}, now {new[key]!r}"
    if len(old["sources"]) != len(new["sources"]):
        return f"the inputs were {len(old['sources'])} files, now {len(new['sources'])}"
    for number, (a, b) in enumerate(zip(old["sources"], new["sources"])):
        if a["path"] != b["path"]:
            return f"input file {number} was {a['path']}, now {b['path']}"
        if a != b:
            return (f"input file {a['path']} changed since (size {a['size']}, sha256 "
                    f"{a['sha256'][:12]} then; size {b['size']}, sha256 {b['sha256'][:12]} now)")
    return None


class _WorkDir:
    """``PREFIX.work/``: the arguments of the run (``manifest.json``) and its completed shards.

    A rerun with the same arguments reuses the completed shards, so a killed run continues from
    the last complete input file; a rerun with other arguments refuses them. An exclusive lock
    (``lock``) keeps two runs off one prefix.
    """

    def __init__(self, prefix: str, manifest: dict):
        import fcntl

        self.prefix, self.path = prefix, work_dir(prefix)
        manifest = {"format": WORK_FORMAT, **manifest}
        found = {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()
        if (self.path.exists() and not self.path.is_dir()) or (
                "manifest.json" not in found and found - {"lock", "manifest.json.tmp"}):
            # Whatever is there is not ours, and the work directory is deleted at the end.
            raise DataError(f"{self.path} exists and is not a preprocessing work directory (no "
                            f"manifest.json in it). Move it away, or choose another "
                            f"--output-prefix.")
        self.path.mkdir(exist_ok=True)
        self._lock = open(self.path / "lock", "w")
        try:
            # A POSIX record lock belongs to this process alone: the forked tokenizing workers
            # do not inherit it, so it ends with this process even if a worker outlives it.
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise DataError(f"Another `flagscale preprocess` is writing {prefix} (it holds "
                            f"{self.path / 'lock'}). Wait for it, or choose another "
                            f"--output-prefix.") from None
        manifest_path = self.path / "manifest.json"
        if manifest_path.is_file():
            try:
                old = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = {}
            why = _manifest_difference(old, manifest)
            if why is not None:
                self.release()
                raise DataError(f"{self.path} holds the completed shards of an earlier, "
                                f"interrupted run with other arguments: {why}. They are not "
                                f"reused. Rerun with that run's arguments to finish it, or remove "
                                f"{self.path} to start over.")
        else:
            _write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")

    def shard_path(self, index: int, kind: str) -> Path:
        return self.path / f"{index:06d}{kind}"

    def completed(self, count: int) -> list[dict]:
        """Statistics of the complete shards, in input order. Shards complete in input order, so
        these are the first ones."""
        done = []
        while len(done) < count and (marker := self.shard_path(len(done), ".json")).is_file():
            done.append(json.loads(marker.read_text(encoding="utf-8")))
        return done

    def open_tokens(self, done: list[dict]):
        """``tokens.bin`` opened for appending after the last complete shard's tokens (a killed
        run may have written part of the next shard's). ``done`` is emptied when the file is
        gone (a run killed while renaming its outputs into place): every shard is redone."""
        path = self.path / "tokens.bin"
        if done and not (path.is_file() and path.stat().st_size >= done[-1]["tokens_end"]):
            done.clear()
        if not done:
            return open(path, "wb")
        tokens = open(path, "r+b")
        tokens.truncate(done[-1]["tokens_end"])
        tokens.seek(done[-1]["tokens_end"])
        return tokens

    def release(self) -> None:
        self._lock.close()

    def remove(self) -> None:
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


class _ShardWriter:
    """Writes one input file's documents: tokens appended to the run's ``tokens.bin``, the rest
    under temporary names that ``finish`` renames, the statistics marker last."""

    def __init__(self, work: _WorkDir, index: int, tokens):
        self.finals = [work.shard_path(index, kind) for kind in _SHARD_FILES]
        self.temps = [p.with_name(p.name + ".tmp") for p in self.finals]
        self.tokens = tokens
        self.rejected = open(self.temps[2], "w", encoding="utf-8")
        self.lengths: list[np.ndarray] = []
        self.records: list[np.ndarray] = []
        self.stats = {"documents": 0, "tokens": 0, "input_bytes": 0, "rejected": Counter(),
                      "first_rejections": []}

    def add(self, tokens: np.ndarray, lengths: np.ndarray, records: np.ndarray,
            rejections: list[Rejection], read: int) -> None:
        self.tokens.write(memoryview(tokens))
        self.lengths.append(lengths)
        self.records.append(records)
        for rejection in rejections:
            self.stats["rejected"][rejection.reason] += 1
            if len(self.stats["first_rejections"]) < SHOWN_REJECTIONS:
                self.stats["first_rejections"].append(rejection.to_json())
            self.rejected.write(json.dumps(rejection.to_json(), ensure_ascii=False) + "\n")
        self.stats["documents"] += len(lengths)
        self.stats["tokens"] += int(tokens.size)
        self.stats["input_bytes"] += read

    def finish(self) -> None:
        self.rejected.close()
        # In the file before the marker says so: a rerun after a kill trusts the marker.
        self.tokens.flush()
        self.stats["tokens_end"] = self.tokens.tell()
        for temp, arrays, empty in ((self.temps[0], self.lengths, np.empty(0, np.int32)),
                                    (self.temps[1], self.records, np.empty(0, RECORD_DTYPE))):
            with open(temp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, np.concatenate(arrays or [empty]))
        self.temps[3].write_text(json.dumps(self.stats, ensure_ascii=False), encoding="utf-8")
        for temp, final in zip(self.temps, self.finals):
            os.replace(temp, final)

    def close(self) -> None:
        self.rejected.close()


def preprocess(inputs: Sequence[str | Path], output_prefix: str | Path, tokenizer: Tokenizer,
               workers: int = 1, json_key: str = "text", strict: bool = False,
               progress: bool = False, block_bytes: int = BLOCK_BYTES) -> PreprocessResult:
    """Tokenize ``inputs`` (files, directories, glob patterns; see :mod:`flagscale.data.sources`)
    into ``PREFIX.bin``/``.idx`` with provenance sidecar ``PREFIX.prov.npy``/``.prov.json`` and
    ``PREFIX.rejected.jsonl``.

    Each input file is a shard: once all its documents are tokenized, they are stored complete in
    ``PREFIX.work/`` (see :class:`_WorkDir`), and the outputs are their concatenation in input
    order, so a run killed part-way and rerun with the same arguments tokenizes only the files
    not yet complete and writes the same bytes as an uninterrupted run. Every output is written
    under a temporary name and renamed only when all are complete, the provenance metadata last;
    the work directory is then removed. Raises DataError for missing inputs, for the first
    rejected record or unreadable file when ``strict``, and when no document survives (these
    remove the work directory: a rerun needs other inputs).
    """
    # megatron-core's first import takes seconds: keep it out of the throughput figures.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    files, skipped = expand_inputs(inputs)
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}.")
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    sources = source_entries(files)
    dtype = token_dtype(tokenizer.vocab_size)
    result = PreprocessResult(prefix, 0, 0, 0, 0.0, outputs=output_paths(prefix),
                              skipped_files=skipped)
    work = _WorkDir(prefix, {
        "sources": [{k: v for k, v in s.items() if k != "documents"} for s in sources],
        "tokenizer": tokenizer.identity(), "json_key": json_key, "strict": strict})
    # Decompressed sizes are unknown up front: with compressed or Parquet inputs the bar shows
    # no percentage.
    plain = all(f.compression is None and f.format != "parquet" for f in files)
    done = work.completed(len(files))
    shard = token_file = bar = None
    try:
        token_file = work.open_tokens(done)
        result.resumed_files = next_index = len(done)
        bar = Progress(progress, sum(s["size"] for s in sources) if plain else None, started,
                       "preprocess", initial=sum(d["input_bytes"] for d in done))
        documents = sum(d["documents"] for d in done)
        tokens = sum(d["tokens"] for d in done)
        results = encoded_blocks(files, tokenizer, workers, json_key, block_bytes,
                                 first=len(done))
        for index, blocks in itertools.groupby(results, key=lambda item: item[0][1]):
            _finish_empty(work, range(next_index, index), token_file)
            shard = _ShardWriter(work, index, token_file)
            source = str(files[index].path)
            for task, (block_tokens, lengths, where_a, where_b, rejected) in blocks:
                rejections = block_rejections(task, source, rejected)
                if strict and rejections:
                    raise DataError(f"{rejections[0]}. --strict stops at the first rejected "
                                    f"record; fix it or drop --strict to skip such records.")
                read = block_bytes_read(task)
                shard.add(block_tokens.astype(dtype, copy=False), lengths,
                          block_records(index, lengths, where_a, where_b), rejections, read)
                documents += len(lengths)
                tokens += int(block_tokens.size)
                bar.update(read, documents, tokens)
            shard.finish()
            shard, next_index = None, index + 1
        _finish_empty(work, range(next_index, len(files)), token_file)
        token_file.close()
        # megatron-core's builder writes the .idx; the tokens are already in tokens.bin, so its
        # own .bin stays empty.
        _assemble(work, files, sources, result, tokenizer, dtype, json_key,
                  IndexedDatasetBuilder(str(work.path / "index-only.bin"), dtype=dtype))
    except DataError:
        work.remove()
        raise
    finally:
        if bar is not None:
            bar.close()
        if shard is not None:
            shard.close()
        if token_file is not None:
            token_file.close()
        work.release()
    work.remove()
    result.seconds = time.perf_counter() - started
    return result


def _finish_empty(work: _WorkDir, indices: range, tokens) -> None:
    """Complete the shards of files that gave no block (empty files) as empty shards."""
    for index in indices:
        _ShardWriter(work, index, tokens).finish()


def _assemble(work: _WorkDir, files: Sequence[InputFile], sources: list[dict],
              result: PreprocessResult, tokenizer: Tokenizer, dtype, json_key: str,
              builder) -> None:
    """Concatenate the complete shards of ``work`` in input order into the outputs of
    ``result.prefix`` (their tokens are already one file): written in the work directory, then
    renamed into place, the provenance metadata last."""
    shards = work.completed(len(files))
    temps = {".bin": work.path / "tokens.bin", ".idx": work.path / "all.idx",
             ".rejected.jsonl": work.path / "all.rejected.jsonl"}
    records = []
    with open(temps[".rejected.jsonl"], "wb") as rejected_file:
        for index, stats in enumerate(shards):
            _add_index(builder, np.load(work.shard_path(index, ".lengths.npy")))
            records.append(np.load(work.shard_path(index, ".prov.npy")))
            with open(work.shard_path(index, ".rejected.jsonl"), "rb") as f:
                shutil.copyfileobj(f, rejected_file, 1 << 24)
            sources[index]["documents"] = stats["documents"]
            result.documents += stats["documents"]
            result.tokens += stats["tokens"]
            result.input_bytes += stats["input_bytes"]
            result.rejected.update(stats["rejected"])
            for shown in stats["first_rejections"]:
                if len(result.first_rejections) < SHOWN_REJECTIONS:
                    result.first_rejections.append(Rejection(**shown))
    builder.finalize(str(temps[".idx"]))
    if result.documents == 0:
        shown = "; ".join(map(str, result.first_rejections)) or "every line is blank"
        raise DataError(f"No documents in {', '.join(str(f.path) for f in files)}: {shown}. "
                        f"Check --json-key (now {json_key!r}) and the input format.")
    meta = {"documents": result.documents, "tokens": result.tokens,
            "token_dtype": np.dtype(dtype).name, "json_key": json_key,
            "sources": sources, "tokenizer": tokenizer.identity(),
            "rejected": dict(sorted(result.rejected.items()))}
    prov_temps = write_provenance(result.prefix, np.concatenate(records), meta, ".tmp")
    prefix = result.prefix
    for temp, final in ((temps[".bin"], prefix + ".bin"), (temps[".idx"], prefix + ".idx"),
                        (temps[".rejected.jsonl"], prefix + ".rejected.jsonl"),
                        *zip(prov_temps, prov_paths(prefix))):
        os.replace(temp, final)

"""Tokenize text files into a megatron-core indexed dataset with a provenance sidecar.

    result = preprocess(["a.jsonl", "b.txt.gz"], "data/mix", load_tokenizer("tok.model"), workers=4)

Inputs, in the order given, line by line:
- ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line, the document is its ``json_key``.
- ``.txt`` / ``.text``: one document per non-blank line (a trailing ``\\r`` is dropped).
- any of these with ``.gz`` appended (line numbers and byte offsets refer to the decompressed text).
Blank lines are not records and are skipped in both formats. Every other line that yields no
document (invalid UTF-8, invalid JSON, not an object, missing or non-string key, empty text) is a
rejection: counted by reason, written to ``PREFIX.rejected.jsonl``, or a DataError under ``strict``.

Each document is its tokens plus the tokenizer's end-of-document id, stored as one sequence of one
document in ``PREFIX.bin``/``.idx`` (uint16 when the vocabulary has fewer than 65500 ids).

Speed and determinism: the main process reads fixed-size blocks of whole lines and hands them to a
pool of workers that decode, parse and tokenize them; results come back in block order and the main
process only writes. Blocks depend on the input bytes alone, never on the worker count, so the
output is byte-identical for any ``workers``. At most ``4 * workers`` blocks are in flight, so
memory stays bounded for inputs of any size.
"""

from __future__ import annotations

import gzip
import itertools
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
from flagscale.data.tokenizer import Tokenizer, file_sha256, load_tokenizer
from flagscale.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
BLOCK_BYTES = 256 * 1024
SHOWN_REJECTIONS = 5


def input_format(path: str | Path) -> tuple[str, bool]:
    """(``"json"`` or ``"text"``, gzipped?) of an input file, from its name."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(JSON_SUFFIXES):
        return "json", gz
    if name.endswith(TEXT_SUFFIXES):
        return "text", gz
    raise DataError(f"Input {path}: unknown format. Name it *.jsonl (one JSON object per line), "
                    f"*.txt (one document per line), optionally with .gz appended.")


@dataclass
class Rejection:
    """One input line that produced no document."""

    source: str
    line: int
    byte_offset: int
    reason: str
    """Category, counted in the summary: ``invalid UTF-8``, ``invalid JSON``, ``not a JSON
    object``, ``missing key``, ``non-string text``, ``empty text``."""
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason} ({self.detail})"


@dataclass
class PreprocessResult:
    """What a preprocessing run produced."""

    prefix: str
    documents: int
    tokens: int
    input_bytes: int
    """Bytes of input read (decompressed for .gz)."""
    seconds: float
    rejected: Counter = field(default_factory=Counter)
    """Rejected lines by reason."""
    first_rejections: list = field(default_factory=list)
    """The first few :class:`Rejection` objects, in input order."""
    outputs: list = field(default_factory=list)

    def summary(self) -> str:
        """One line with the numbers a user wants."""
        rate = self.tokens / max(self.seconds, 1e-9)
        mbs = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.rejected.items()))
        return (f"{self.documents:,} documents, {self.tokens:,} tokens from "
                f"{self.input_bytes / 1e6:.2f} MB in {self.seconds:.1f} s ({rate:,.0f} tokens/s, "
                f"{mbs:.2f} MB/s); {rejected:,} lines rejected{f' ({reasons})' if reasons else ''}"
                f" -> {self.prefix}.bin/.idx")


# ---- worker side: decode, parse and tokenize one block of lines --------------------------------

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


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


def encode_block(task: tuple, tokenizer: Optional[Tokenizer] = None) -> tuple:
    """Tokenize one block: ``(source_index, fmt, json_key, first_line, first_offset, data)`` ->
    ``(tokens, lengths, lines, offsets, rejections)``; tokens include each document's eod."""
    tok = tokenizer or _worker_tokenizer
    _, fmt, json_key, first_line, offset, data = task
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
    encoded = tok.encode_batch(texts)
    eod = tok.eod
    for ids in encoded:
        ids.append(eod)
    lengths = np.fromiter(map(len, encoded), dtype=np.int32, count=len(encoded))
    dtype = token_dtype(tok.vocab_size)
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                         count=int(lengths.sum()))
    return (tokens, lengths, np.asarray(lines, dtype=np.uint64),
            np.asarray(offsets, dtype=np.uint64), rejections)


def token_dtype(vocab_size: int):
    """The .bin token dtype megatron-core picks for this vocabulary (uint16 below 65500)."""
    return np.uint16 if vocab_size < 65500 else np.int32


# ---- main side: read blocks, dispatch in order, write ------------------------------------------

def read_blocks(path: Path, gz: bool, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple]:
    """Yield ``(first_line, first_offset, data)`` blocks of whole lines of ``path``."""
    opener = gzip.open if gz else open
    line, offset, carry = 1, 0, []  # carry: pieces of a line longer than one block
    try:
        with opener(path, "rb") as f:
            while block := f.read(block_bytes):
                cut = block.rfind(b"\n")
                if cut < 0:
                    carry.append(block)
                    continue
                data = b"".join(carry + [block[:cut + 1]])
                carry = [block[cut + 1:]]
                yield line, offset, data
                line += data.count(b"\n")
                offset += len(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"Input {path}: cannot read it after line {line} ({exc}). Check the "
                        f"file (a truncated .gz download?).") from None
    if any(carry):
        yield line, offset, b"".join(carry)


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
    with pool_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer.path,)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(encode_block, (task,))))
            if len(pending) >= 4 * workers:
                head, result = pending.popleft()
                yield head, result.get()
        while pending:
            head, result = pending.popleft()
            yield head, result.get()


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
    """Tokenize ``inputs`` (in order) into ``PREFIX.bin``/``.idx`` with provenance sidecar
    ``PREFIX.prov.npy``/``.prov.json`` and ``PREFIX.rejected.jsonl``.

    Every output is written under a temporary name and renamed only when all are complete, the
    provenance metadata last. Raises DataError for unreadable inputs, for the first rejected line
    when ``strict``, and when no document survives.
    """
    # megatron-core's first import takes seconds: keep it out of the throughput figures.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("No input files given. Pass --input FILE [FILE ...].")
    formats = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"Input {path} does not exist.")
        formats.append(input_format(path))
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}.")
    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp{os.getpid()}"
    finals = output_paths(prefix)
    temps = [f + suffix for f in finals]
    sources = [{"path": str(p.resolve()), "format": fmt, "gzip": gz, "size": p.stat().st_size,
                "sha256": file_sha256(p), "documents": 0}
               for p, (fmt, gz) in zip(paths, formats)]
    dtype = token_dtype(tokenizer.vocab_size)
    result = PreprocessResult(prefix, 0, 0, 0, 0.0, outputs=finals)
    tasks = ((index, fmt, json_key, line, offset, data)
             for index, (path, (fmt, gz)) in enumerate(zip(paths, formats))
             for line, offset, data in read_blocks(path, gz, block_bytes))
    # Decompressed sizes are unknown up front: with .gz inputs the bar shows no percentage.
    total = None if any(gz for _, gz in formats) else sum(s["size"] for s in sources)
    bar = None
    records = []
    builder = None
    try:
        builder = IndexedDatasetBuilder(temps[0], dtype=dtype)
        with open(temps[2], "w", encoding="utf-8") as rejected_file:
            for task, (tokens, lengths, lines, offsets, rejections) in _ordered_results(
                    tasks, tokenizer, workers):
                index = task[0]
                source = str(paths[index])
                for line, offset, reason, detail in rejections:
                    rejection = Rejection(source, line, offset, reason, detail)
                    if strict:
                        raise DataError(f"{rejection}. --strict stops at the first rejected "
                                        f"line; fix it or drop --strict to skip such lines.")
                    result.rejected[reason] += 1
                    if len(result.first_rejections) < SHOWN_REJECTIONS:
                        result.first_rejections.append(rejection)
                    rejected_file.write(json.dumps(
                        {"source": source, "line": line, "byte_offset": offset,
                         "reason": reason, "detail": detail}, ensure_ascii=False) + "\n")
                _add_documents(builder, tokens, lengths)
                block = np.empty(len(lengths), dtype=RECORD_DTYPE)
                block["source"], block["line"], block["byte_offset"] = index, lines, offsets
                records.append(block)
                sources[index]["documents"] += len(lengths)
                result.documents += len(lengths)
                result.tokens += int(tokens.size)
                result.input_bytes += len(task[-1])
                if progress:
                    if bar is None:  # created only now that the worker pool exists
                        from tqdm import tqdm
                        bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess",
                                   mininterval=0.5, dynamic_ncols=True)
                    bar.update(len(task[-1]))
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(docs=f"{result.documents:,}",
                                    tokens=f"{result.tokens:,}",
                                    tok_s=f"{result.tokens / elapsed:,.0f}", refresh=False)
        builder.finalize(temps[1])
        if result.documents == 0:
            shown = "; ".join(map(str, result.first_rejections)) or "every line is blank"
            raise DataError(f"No documents in {', '.join(map(str, paths))}: {shown}. Check "
                            f"--json-key (now {json_key!r}) and the input format.")
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

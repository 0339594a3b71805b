"""Preprocessing throughput against the bare tokenizer, measured in one run.

    python benchmarks/preprocess.py [--workers 2] [--repeat 3] [--tokenizer SPEC] [--rounds 3]

Input: the bundled corpus written ``--repeat`` times into one uncompressed JSONL file. Two
measurements on the same documents with the same number of worker processes, alternated over
``--rounds`` rounds (the best of each is kept, which filters out other load on the machine):

- bare: a pool of N processes (started inside the timed region, same start method) encodes the already-parsed texts,
  in the same blocks preprocessing uses, and returns the token ids to the parent (what any
  N-process tokenizing program must at least do); "bare, ids dropped" returns only their count,
  the pure encoding cost, a stricter reference;
- preprocess: :func:`flagscale.data.preprocess`, i.e. reading, UTF-8 and JSON validation,
  tokenizing, writing ``.bin``/``.idx``, provenance and the rejected file.

Prints tokens/s and MB/s of each and the throughput ratio (goal: preprocess >= 0.9 x bare), plus
the CPU seconds each spent (parent and workers): on a machine shared with other work, wall-clock
throughput swings with the load while the CPU-time ratio shows the pipeline's own overhead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from flagscale.data import default_corpus_path, default_tokenizer_path, load_tokenizer, preprocess
from flagscale.data.preprocess import BLOCK_BYTES, pool_context, read_blocks

_tokenizer = None


def _init(path: str) -> None:
    global _tokenizer
    _tokenizer = load_tokenizer(path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _tokenizer.encode_batch(texts)


def _count(texts: list[str]) -> int:
    return sum(len(ids) + 1 for ids in _tokenizer.encode_batch(texts))


def bare(blocks: list[list[str]], tokenizer_path: str, workers: int,
         keep_ids: bool) -> tuple[float, int]:
    """Seconds and tokens (eod included, as preprocess counts) for N spawned processes encoding
    ``blocks``, returning the ids or only their count."""
    started = time.perf_counter()
    with pool_context().Pool(workers, initializer=_init, initargs=(tokenizer_path,)) as pool:
        if keep_ids:
            tokens = sum(len(ids) + 1 for block in pool.imap(_encode, blocks) for ids in block)
        else:
            tokens = sum(pool.imap(_count, blocks))
    return time.perf_counter() - started, tokens


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished (joined) children."""
    own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="copies of the bundled corpus")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", default=str(default_tokenizer_path()))
    args = parser.parse_args(argv)
    # Imported before timing: megatron-core's import (seconds) is a one-off, not throughput.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "corpus.jsonl"
        with gzip.open(default_corpus_path(), "rb") as f:
            corpus = f.read()
        source.write_bytes(corpus * args.repeat)
        size = source.stat().st_size
        blocks = [[json.loads(line)["text"] for line in data.splitlines()]
                  for _, _, data in read_blocks(source, gz=False, block_bytes=BLOCK_BYTES)]
        names = ("bare tokenizer", "bare, ids dropped", "preprocess")
        best = {name: float("inf") for name in names}
        cpu = {name: float("inf") for name in names}
        for _ in range(args.rounds):
            for name, keep_ids in (("bare tokenizer", True), ("bare, ids dropped", False)):
                cpu_start = cpu_seconds()
                seconds, bare_tokens = bare(blocks, tokenizer.path, args.workers, keep_ids)
                best[name] = min(best[name], seconds)
                cpu[name] = min(cpu[name], cpu_seconds() - cpu_start)
            cpu_start = cpu_seconds()
            result = preprocess([source], Path(tmp) / "out", tokenizer, workers=args.workers)
            best["preprocess"] = min(best["preprocess"], result.seconds)
            cpu["preprocess"] = min(cpu["preprocess"], cpu_seconds() - cpu_start)
            if result.tokens != bare_tokens:
                sys.exit(f"token counts differ: preprocess {result.tokens}, bare {bare_tokens}")
    tokens = result.tokens
    print(f"input: {size / 1e6:.1f} MB, {result.documents:,} documents, {tokens:,} tokens; "
          f"tokenizer {tokenizer.kind} vocab {tokenizer.vocab_size}; {args.workers} worker "
          f"processes; best of {args.rounds} rounds")
    for name, seconds in best.items():
        print(f"  {name:18s} {seconds:6.2f} s  {tokens / seconds:12,.0f} tokens/s  "
              f"{size / 1e6 / seconds:7.2f} MB/s  {cpu[name]:6.2f} CPU s")
    ours, ours_cpu = best["preprocess"], cpu["preprocess"]
    print(f"throughput ratio preprocess / bare tokenizer: {best['bare tokenizer'] / ours:.3f} "
          f"(goal >= 0.9); / bare with ids dropped: {best['bare, ids dropped'] / ours:.3f}")
    print(f"CPU-time ratio   preprocess / bare tokenizer: {cpu['bare tokenizer'] / ours_cpu:.3f}; "
          f"/ bare with ids dropped: {cpu['bare, ids dropped'] / ours_cpu:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

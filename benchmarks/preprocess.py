"""Preprocessing throughput against the bare tokenizer on the same cores, for a 32K sentencepiece
tokenizer (Llama 2 / Mistral style) and a 128K byte-level BPE tokenizer.json (Llama 3 style).

    python benchmarks/preprocess.py [--workers 2] [--megabytes 20] [--rounds 3]
                                    [--sp tokenizer.model] [--bpe tokenizer.json]

Without --sp/--bpe it trains both on the bundled corpus (no network), each in a child process: a
32,000-piece sentencepiece BPE, and a 128,000-token byte-level BPE with Llama 3's pre-tokenizer
pattern (the corpus is too small for 128K merges of its own, so generated words are added to the
training text). Pass real tokenizers (Llama 2's tokenizer.model, Llama 3's tokenizer.json) where
you have them.

Input: the bundled corpus (5 MB) repeated to about ``--megabytes`` of uncompressed JSONL. For each
tokenizer, alternated over ``--rounds`` rounds (the best of each is kept, which filters out other
load):

- bare, N processes: a pool of N processes (started inside the timed region, tokenizer loaded in
  each) encodes the already-parsed texts in preprocessing's blocks and returns the ids;
- bare, 1 process x N threads: one fresh process loads the tokenizer and encodes every text with
  the library's own N-thread batch call (HF ``encode_batch`` with RAYON_NUM_THREADS=N,
  sentencepiece ``num_threads=N``), as a user would;
- preprocess: :func:`flagscale.data.preprocess` with N workers: reading, UTF-8 and JSON checks,
  tokenizing, writing ``.bin``/``.idx``, provenance and the rejected file.

Prints, side by side, the throughput ratio preprocess / faster bare reference (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flagscale.data import default_corpus_path, load_tokenizer, preprocess
from flagscale.data.preprocess import BLOCK_BYTES, pool_context
from flagscale.data.sources import InputFile, read_line_blocks
from flagscale.data.tokenizer import LLAMA3_PATTERN

_tokenizer = None

# One process, the library's threads: run in a fresh interpreter so the thread count applies.
_THREADED = """
import json, sys, time
started = time.perf_counter()
from flagscale.data import load_tokenizer
tok = load_tokenizer(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
threads = int(sys.argv[3])
if tok.kind == "hf":
    ids = [e.ids for e in tok._tok.encode_batch(texts, add_special_tokens=False)]
elif tok.kind == "sentencepiece":
    ids = tok._sp.Encode(texts, out_type=int, num_threads=threads)
else:
    ids = tok._enc.encode_ordinary_batch(texts, num_threads=threads)
print(time.perf_counter() - started, sum(len(i) + 1 for i in ids))
"""


def _init(path: str) -> None:
    global _tokenizer
    _tokenizer = load_tokenizer(path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _tokenizer.encode_batch(texts)


def bare_processes(blocks: list[list[str]], path: str, workers: int) -> tuple[float, int]:
    """Seconds and tokens (eod included) for N processes encoding ``blocks``."""
    started = time.perf_counter()
    with pool_context().Pool(workers, initializer=_init, initargs=(path,)) as pool:
        tokens = sum(len(ids) + 1 for block in pool.imap(_encode, blocks) for ids in block)
    return time.perf_counter() - started, tokens


def bare_threads(source: Path, path: str, workers: int) -> tuple[float, int]:
    """Seconds and tokens for one fresh process encoding every text with N library threads."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", _THREADED, path, str(source), str(workers)],
                         env=env, check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def corpus_texts() -> list[str]:
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_sentencepiece(path: Path, vocab_size: int = 32000) -> Path:
    """A sentencepiece BPE of ``vocab_size`` pieces trained on the bundled corpus."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus_texts()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        num_threads=os.cpu_count(), minloglevel=2, max_sentence_length=1 << 20)
    path.write_bytes(model.getvalue())
    return path


def train_bpe(path: Path, vocab_size: int = 128000) -> Path:
    """A byte-level BPE tokenizer.json of ``vocab_size`` tokens with Llama 3's pattern, trained on
    the bundled corpus plus generated words (enough distinct pairs for the merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 6))) for _ in range(300000)})
    generated = [" ".join(rng.choices(words, k=200)) for _ in range(20000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts() + generated, trainer)
    tok.save(str(path))
    return path


def _in_child(train, path: Path) -> str:
    """Run ``train(path)`` in a child process and return ``path``. Training starts the HF
    library's thread pool, and a process forked after that encodes on its serial path (about 20%
    slower, as measured here): trained in this process, the tokenizer would slow the forked
    workers measured below, which a user's fresh ``flagscale preprocess`` never suffers."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=train, args=(path,))
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"training the benchmark tokenizer {path.name} failed (exit {child.exitcode})")
    return str(path)


def measure(name: str, tokenizer_path: str, source: Path, blocks, workers: int,
            rounds: int, out_dir: Path) -> dict:
    """Best seconds of each measurement for one tokenizer."""
    tokenizer = load_tokenizer(tokenizer_path)
    best = {"processes": float("inf"), "threads": float("inf"), "preprocess": float("inf")}
    for _ in range(rounds):
        seconds, bare_tokens = bare_processes(blocks, tokenizer.path, workers)
        best["processes"] = min(best["processes"], seconds)
        seconds, thread_tokens = bare_threads(source, tokenizer.path, workers)
        best["threads"] = min(best["threads"], seconds)
        result = preprocess([source], out_dir / name, tokenizer, workers=workers)
        best["preprocess"] = min(best["preprocess"], result.seconds)
        if not result.tokens == bare_tokens == thread_tokens:
            sys.exit(f"{name}: token counts differ: preprocess {result.tokens}, bare "
                     f"{bare_tokens}, threaded {thread_tokens}")
    best.update(tokens=result.tokens, kind=tokenizer.kind, vocab=tokenizer.vocab_size,
                ratio=min(best["processes"], best["threads"]) / best["preprocess"])
    return best


def main(argv: list[str] | None = None) -> int:
    """Train or load both tokenizers, run the measurements, print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--megabytes", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sp", help="sentencepiece model (default: train a 32K one)")
    parser.add_argument("--bpe", help="HF tokenizer.json (default: train a 128K one)")
    args = parser.parse_args(argv)
    # Imported before timing: megatron-core's import (seconds) is a one-off, not throughput.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizers = {
            "sentencepiece": args.sp or _in_child(train_sentencepiece, tmp / "sp.model"),
            "hf bpe": args.bpe or _in_child(train_bpe, tmp / "tokenizer.json")}
        source = tmp / "corpus.jsonl"
        with gzip.open(default_corpus_path(), "rb") as f:
            corpus = f.read()
        copies = max(1, round(args.megabytes * 1e6 / len(corpus)))
        source.write_bytes(corpus * copies)
        size = source.stat().st_size
        blocks = [[json.loads(line)["text"] for line in task[-1].splitlines()]
                  for task in read_line_blocks(0, InputFile(source, "json", None), "text",
                                               BLOCK_BYTES)]
        results = {name: measure(name.replace(" ", "_"), path, source, blocks, args.workers,
                                 args.rounds, tmp)
                   for name, path in tokenizers.items()}
    print(f"input: {size / 1e6:.1f} MB of JSONL, {args.workers} cores (worker processes or "
          f"threads), best of {args.rounds} rounds; seconds include loading the tokenizer")
    names = list(results)
    print(f"{'':34s}" + "".join(f"{n:>22s}" for n in names))
    print(f"{'tokenizer':34s}" + "".join(f"{r['kind'] + ' ' + format(r['vocab'], ','):>22s}"
                                         for r in results.values()))
    for key, label in (("processes", "bare, N processes (s)"),
                       ("threads", "bare, 1 process x N threads (s)"),
                       ("preprocess", "flagscale preprocess (s)")):
        print(f"{label:34s}" + "".join(f"{results[n][key]:22.2f}" for n in names))
    print(f"{'preprocess tokens/s':34s}" + "".join(
        f"{results[n]['tokens'] / results[n]['preprocess']:22,.0f}" for n in names))
    print(f"{'ratio to faster bare (goal >= 0.9)':34s}" + "".join(
        f"{results[n]['ratio']:22.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

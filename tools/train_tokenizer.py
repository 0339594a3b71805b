"""Train the bundled sentencepiece tokenizer from the bundled corpus.

    python tools/train_tokenizer.py            # writes flagscale/data/corpus/tokenizer.model

A byte-fallback BPE of exactly 4096 pieces (the ``tiny`` preset's vocab_size): ids 0-3 are
<pad>, <unk>, <s>, </s> (</s> is the end-of-document token), then the 256 byte pieces, so any
UTF-8 text encodes. Identity normalisation and no dummy prefix make decode(encode(x)) == x.
Training is single-threaded over every sentence in file order with a fixed seed, so the same corpus
always gives the same model bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import io
import sys
from pathlib import Path
from typing import Iterator

CORPUS_DIR = Path(__file__).resolve().parent.parent / "flagscale" / "data" / "corpus"
VOCAB_SIZE = 4096


def sentences(corpus: Path) -> Iterator[str]:
    """Every non-blank line of every document: sentencepiece trains on newline-free sentences."""
    with gzip.open(corpus, "rt", encoding="utf-8") as src:
        for line in src:
            for sentence in json.loads(line)["text"].split("\n"):
                if sentence.strip():
                    yield sentence


def main(argv: list[str] | None = None) -> int:
    """Train and write the model."""
    import sentencepiece as spm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR / "corpus.jsonl.gz")
    parser.add_argument("--output", type=Path, default=CORPUS_DIR / "tokenizer.model")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    # Training from an iterator into memory keeps temporary paths out of the model's trainer
    # spec, which would otherwise make every run's bytes differ.
    model = io.BytesIO()
    spm.set_random_generator_seed(1234)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=sentences(args.corpus), model_writer=model,
        vocab_size=args.vocab_size, model_type="bpe", byte_fallback=True,
        character_coverage=0.995, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_name(args.output.name + ".tmp")
    tmp_out.write_bytes(model.getvalue())
    tmp_out.replace(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes, vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

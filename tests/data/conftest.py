"""Shared inputs of the data tests: files with unicode and every kind of malformed line, whose
expected documents and rejections are known by construction."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from flagscale.data import default_tokenizer_path, load_tokenizer

# (raw line bytes, expected document text or None, rejection reason or None)
JSONL_LINES = [
    (json.dumps({"text": "Hello, world."}).encode(), "Hello, world.", None),
    (json.dumps({"text": "白日依山尽，黄河入海流。", "id": 2}, ensure_ascii=False).encode(),
     "白日依山尽，黄河入海流。", None),
    (b'{"text": "emoji \\ud83d\\ude00 and \xf0\x9f\x9a\x80 rocket"}', "emoji 😀 and 🚀 rocket",
     None),
    (b'{"text": "broken json", ', None, "invalid JSON"),
    (b'{"text": "bad \xff\xfe bytes"}', None, "invalid UTF-8"),
    (b"", None, None),  # blank line: not a record
    (json.dumps({"text": ""}).encode(), None, "empty text"),
    (json.dumps({"body": "no text key"}).encode(), None, "missing key"),
    (json.dumps({"text": 42}).encode(), None, "non-string text"),
    (b"[1, 2, 3]", None, "not a JSON object"),
    (json.dumps({"text": "multi\nline\ttext with  spaces "}).encode() + b"\r",
     "multi\nline\ttext with  spaces ", None),
    (json.dumps({"text": "Ünïcödé ñ ß — «quotes» 日本語"}, ensure_ascii=False).encode(),
     "Ünïcödé ñ ß — «quotes» 日本語", None),
] + [(json.dumps({"text": f"document number {i} 第{i}篇"}, ensure_ascii=False).encode(),
      f"document number {i} 第{i}篇", None) for i in range(40)]

TEXT_LINES = [
    ("plain text line one".encode(), "plain text line one", None),
    (b"   ", None, None),
    ("第二行 with 中文 and emoji 🎉".encode(), "第二行 with 中文 and emoji 🎉", None),
    (b"latin-1 caf\xe9", None, "invalid UTF-8"),
    (b"last line without newline", "last line without newline", None),
]


def write_lines(path: Path, lines, final_newline: bool = True) -> Path:
    """Write raw lines joined by newlines (gzip when the name ends in .gz)."""
    data = b"\n".join(raw for raw, _, _ in lines) + (b"\n" if final_newline else b"")
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def sp_tokenizer():
    """The bundled sentencepiece tokenizer."""
    return load_tokenizer(default_tokenizer_path())


@pytest.fixture
def inputs(tmp_path):
    """A JSONL file, a gzipped JSONL file and a text file (no final newline), with the expected
    (file, line, text) documents and (file, line, reason) rejections in input order."""
    files = [write_lines(tmp_path / "a.jsonl", JSONL_LINES),
             write_lines(tmp_path / "b.jsonl.gz", JSONL_LINES[:12]),
             write_lines(tmp_path / "c.txt", TEXT_LINES, final_newline=False)]
    documents, rejections = [], []
    for path, lines in zip(files, (JSONL_LINES, JSONL_LINES[:12], TEXT_LINES)):
        for number, (_, text, reason) in enumerate(lines, 1):
            if text is not None:
                documents.append((path, number, text))
            if reason is not None:
                rejections.append((path, number, reason))
    return files, documents, rejections


@pytest.fixture(scope="session")
def other_sp_tokenizer(tmp_path_factory):
    """A different sentencepiece tokenizer with the same vocab size (4096) as the bundled one."""
    import io

    import sentencepiece as spm

    from flagscale.data import default_corpus_path

    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=4096, model_type="bpe",
        byte_fallback=True, character_coverage=0.99, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("other") / "other.model"
    path.write_bytes(model.getvalue())
    return load_tokenizer(path)

"""Data: tokenizers, preprocessing into megatron-core indexed datasets, provenance, bundled corpus.

    from flagscale.data import load_tokenizer, preprocess, check_dataset, Provenance
    tok = load_tokenizer(default_tokenizer_path())
    preprocess([default_corpus_path()], "out/corpus", tok, workers=2)
    check_dataset("out/corpus", tok).lookup(0)      # -> Origin(source, line, byte_offset)

Training-time datasets (megatron-core's blended GPT datasets): :mod:`flagscale.data.datasets`.
"""

from pathlib import Path

from flagscale.data.preprocess import PreprocessResult, preprocess
from flagscale.data.provenance import Origin, Provenance, check_dataset
from flagscale.data.tokenizer import Tokenizer, load_tokenizer

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def default_corpus_path() -> Path:
    """The bundled English + Chinese corpus (JSONL, gzipped; see corpus/README.md)."""
    return CORPUS_DIR / "corpus.jsonl.gz"


def default_tokenizer_path() -> Path:
    """The bundled 4096-piece sentencepiece tokenizer trained on the bundled corpus."""
    return CORPUS_DIR / "tokenizer.model"


__all__ = ["Origin", "PreprocessResult", "Provenance", "Tokenizer", "check_dataset",
           "default_corpus_path", "default_tokenizer_path", "load_tokenizer", "preprocess"]

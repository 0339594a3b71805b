"""A sentencepiece model exported as HF tokenizer files encodes and decodes like sentencepiece."""

import gzip
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from flagscale.convert.tokenizer import export_tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "flagscale" / "data" / "corpus" / "tokenizer.model"
TEXTS = ["hello world", "  two  spaces, a tab\tand\na newline  ",
         "naïve Überschall 日本語 🙂",
         "digits 1234567 and 3.14", "", "   ", "trailing "]


def _corpus_lines(n=150):
    with gzip.open(BUNDLED.parent / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def unigram_model(tmp_path_factory):
    """A unigram model with NFKC normalisation, dummy prefix and whitespace folding (the other
    sentencepiece code paths from the bundled identity-normalised BPE)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(_corpus_lines(400)), model_writer=model,
                                   vocab_size=600, model_type="unigram", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2, num_threads=1)
    path = tmp_path_factory.mktemp("sp") / "unigram.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.mark.parametrize("which", ["bundled_bpe", "unigram_nfkc"])
def test_autotokenizer_matches_sentencepiece(which, unigram_model, tmp_path):
    from transformers import AutoTokenizer

    model = BUNDLED if which == "bundled_bpe" else unigram_model
    ids = export_tokenizer(model, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (ids["bos"],
                                                                                 ids["eos"])
    assert tok.pad_token_id == (sp.pad_id() if sp.pad_id() >= 0 else None)
    for text in TEXTS + _corpus_lines():
        expected = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.decode(expected, skip_special_tokens=True) == sp.decode(expected), text
    # flagscale trains on documents without bos: the tokenizer adds nothing around a text.
    assert tok("hello").input_ids == sp.encode("hello")

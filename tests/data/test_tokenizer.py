"""Tokenizers: the bundled one, Hugging Face tokenizer.json, tiktoken, errors, megatron-core's use."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from flagscale.config.presets import MODEL_PRESETS
from flagscale.data import (check_dataset, default_corpus_path, default_tokenizer_path,
                            load_tokenizer, preprocess)
from flagscale.errors import DataError

SAMPLES = ["Hello, world.", "白日依山尽，黄河入海流。", "emoji 😀🚀 ok",
           "  tabs\tand\nnewlines  ", "Ünïcödé ß", "🤖"]


def test_bundled_tokenizer_fits_tiny_model_and_round_trips(sp_tokenizer):
    assert sp_tokenizer.kind == "sentencepiece"
    assert sp_tokenizer.vocab_size == MODEL_PRESETS["tiny"]["vocab_size"] == 4096
    assert (sp_tokenizer.pad, sp_tokenizer.bos, sp_tokenizer.eod) == (0, 2, 3)
    for text in SAMPLES:
        ids = sp_tokenizer.encode(text)
        assert sp_tokenizer.eod not in ids and all(0 <= i < 4096 for i in ids)
        assert sp_tokenizer.decode(ids) == text


def test_bundled_corpus_is_english_and_chinese():
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        sources = [json.loads(line)["source"] for line in f]
    assert len(sources) > 10000
    assert sum(s.startswith("fortunes-zh/") for s in sources) > 3000
    assert sum(not s.startswith("fortunes-zh/") for s in sources) > 3000
    assert (default_corpus_path().parent / "README.md").is_file()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here from a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLES * 20, trainer=trainer)
    directory = tmp_path_factory.mktemp("hf")
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_hf_tokenizer_from_directory_or_file(hf_dir):
    for spec in (hf_dir, hf_dir / "tokenizer.json"):
        tok = load_tokenizer(spec)
        assert tok.kind == "hf" and tok.path == str((hf_dir / "tokenizer.json").resolve())
        assert tok.eod == 0 and tok.pad == 1 and tok.bos is None
        spec = json.loads((hf_dir / "tokenizer.json").read_text())
        assert tok.vocab_size == max(spec["model"]["vocab"].values()) + 1
        for text in SAMPLES:
            assert tok.decode(tok.encode(text)) == text


def test_hf_eos_from_tokenizer_config(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.eod == 1 and tok.pad == -1  # pad == eod is no pad at all for megatron-core


def test_preprocess_with_hf_tokenizer_and_mismatch_error(tmp_path, hf_dir, inputs, sp_tokenizer):
    files, expected, _ = inputs
    tok = load_tokenizer(hf_dir)
    preprocess(files, tmp_path / "hf", tok, workers=2, block_bytes=128)
    dataset = IndexedDataset(str(tmp_path / "hf"))
    for doc_id, (_, _, text) in enumerate(expected):
        ids = dataset[doc_id].tolist()
        assert ids == tok.encode(text) + [tok.eod]
        assert tok.decode(ids) == text
    assert check_dataset(tmp_path / "hf", tok).tokenizer_vocab_size == tok.vocab_size
    with pytest.raises(DataError, match=rf"vocab size {tok.vocab_size}\).*vocab size 4096"):
        check_dataset(tmp_path / "hf", sp_tokenizer)


def test_tokenizer_errors(tmp_path, hf_dir):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"\x00not a model")
    with pytest.raises(DataError, match="junk.model is none of the known kinds"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "cut.model").write_bytes(default_tokenizer_path().read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable sentencepiece model"):
        load_tokenizer(tmp_path / "cut.model")
    (tmp_path / "bad.tiktoken").write_bytes(b"IQ== 0\nnot base64! 1\n")
    with pytest.raises(DataError, match="bad.tiktoken, line 2: expected"):
        load_tokenizer(tmp_path / "bad.tiktoken")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable Hugging Face"):
        load_tokenizer(tmp_path / "bad.json")
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "noeos.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="no end-of-document token"):
        load_tokenizer(tmp_path / "noeos.json")


def test_megatron_gpt_dataset_reads_our_tokenizer_and_data(tmp_path, inputs, sp_tokenizer):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    files, expected, _ = inputs
    preprocess(files, tmp_path / "ds", sp_tokenizer)
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=16, blend=([str(tmp_path / "ds")], None),
        split="100,0,0", path_to_cache=str(tmp_path / "cache"), tokenizer=sp_tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, None, None], lambda: True,
                                                config).build()
    all_tokens = np.concatenate([sp_tokenizer.encode(t) + [sp_tokenizer.eod]
                                 for _, _, t in expected])
    sample = train[0]
    assert sample["tokens"].shape == (16,)
    # No ambiguous-pad fallback: our pad (0) never occurs in text, so every label keeps its loss.
    assert train._pad_token_id == sp_tokenizer.pad == 0
    assert bool(sample["loss_mask"].all())
    assert set(sample["tokens"].tolist()) <= set(all_tokens.tolist())


def write_tiktoken(path):
    """A small tiktoken BPE file: the 256 bytes, then merged pieces of common English words."""
    pieces = [bytes([b]) for b in range(256)]
    for word in ("th", "he", "the", " t", " th", " the", "in", "ing", "an", "and", " and", "er"):
        pieces.append(word.encode())
    path.write_bytes(b"".join(base64.b64encode(p) + b" %d\n" % rank
                              for rank, p in enumerate(pieces)))
    return path


def test_tiktoken_file_is_recognised_with_llama3_special_tokens(tmp_path, inputs):
    (tmp_path / "llama3").mkdir()
    path = write_tiktoken(tmp_path / "llama3" / "tokenizer.model")
    tok = load_tokenizer(tmp_path / "llama3")  # a directory holding it, as Meta ships it
    base = 256 + 12
    assert (tok.kind, tok.vocab_size, tok.bos, tok.eod, tok.pad) == ("tiktoken", base + 256,
                                                                      base, base + 1, -1)
    text = "the cat and the ring 白日依山尽 🚀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[:1] == [258]  # "the" is one token
    # A special token's spelling inside a document is text, not a control token.
    assert tok.eod not in tok.encode("end <|end_of_text|> here")
    assert tok.decode(ids + [tok.eod, base + 9]) == text  # <|eot_id|> is base + 9, dropped
    files, expected, _ = inputs
    preprocess(files, tmp_path / "ds", tok, workers=2)
    dataset = IndexedDataset(str(tmp_path / "ds"))
    assert dataset.index.dtype == np.uint16
    assert [tok.decode(dataset[i]) for i in range(len(dataset))] == [t for _, _, t in expected]
    assert load_tokenizer(path).fingerprint == tok.fingerprint

"""A tiny Qwen2 (q/k/v biases, GQA, tied embeddings) trains on 2 real processes at TP=2 and at
PP=2 (where megatron-core keeps a copy of the embedding on the last stage) with the losses of one
process, and its checkpoints export to a Hugging Face Qwen2 that validates."""

from __future__ import annotations

import json

import pytest
import torch

from flagscale.convert import mcore_to_hf
from flagscale.checkpoint.reader import CheckpointReader
from tests.convert.test_streaming import SPLIT_ROWS, copied_entries
from tests.dist import run_cli
from tests.train.test_parallel_parity import _assert_close, _config, _losses

ITERATIONS = 2


def _qwen2_config(tmp_path, corpus, tokenizer, name, **sections):
    return _config(tmp_path, corpus, tokenizer, name, model={"preset": "tiny_qwen2"},
                   train={"iterations": ITERATIONS}, **sections)


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("qwen2")
    run_cli("train", _qwen2_config(tmp, tiny_corpus, tiny_tokenizer, "single"), "--nproc", "1")
    losses = _losses(tmp / "single")
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
    return losses


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_tiny_qwen2_trains_on_two_processes_like_one(layout, tmp_path, tiny_corpus,
                                                     tiny_tokenizer, single_process_losses):
    cfg = _qwen2_config(tmp_path, tiny_corpus, tiny_tokenizer, "run", parallel=layout,
                        checkpoint={"save_interval": ITERATIONS})
    run_cli("train", cfg, "--nproc", "2")
    _assert_close(_losses(tmp_path / "run"), single_process_losses, 1e-4, f"qwen2 {layout}")
    ckpt = tmp_path / "run" / "checkpoints" / f"iter_{ITERATIONS:07d}"
    reader = CheckpointReader(ckpt)
    assert "decoder.layers.self_attention.linear_qkv.bias" in reader.tensors
    assert "output_layer.weight" not in reader.tensors  # the tied copy is saved once
    result = mcore_to_hf(ckpt, tmp_path / "hf", dtype="fp32")
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
    if layout == {"tp": 2}:
        # The validated export above took both paths: rows split across TP shards are read and
        # joined, everything else is copied file to file.
        copied, everything = copied_entries(ckpt, torch.float32)
        assert copied == everything - SPLIT_ROWS

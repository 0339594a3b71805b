"""A TP change that changes the vocabulary padding resumes and reshards instead of being refused.

vocab_size 4200 pads to 4352 rows at TP=2 (a multiple of 128 * 2) and to 4224 at TP=1. A run
saved at TP=2 resumes at TP=1: every real row of the embedding and output layer (weights, fp32
master weights, both Adam moments) comes through bit for bit, padding rows past 4224 are dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from flagscale.checkpoint.reader import CheckpointReader
from flagscale.config import padded_vocab_size
from tests.dist import run_cli

VOCAB, SAVED, LAST = 4200, 5, 8
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """A TP=2 run with a 4,200-token vocabulary: its iteration-5 checkpoint, losses at 6-8."""
    tmp = tmp_path_factory.mktemp("vocab")
    cfg = {"model": {"preset": "tiny", "params_dtype": "fp32", "vocab_size": VOCAB},
           "parallel": {"tp": 2},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 64,
                     "iterations": LAST, "lr": 2e-3, "min_lr": 2e-4, "warmup_iterations": 1,
                     "log_interval": 1, "seed": 7},
           "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer},
           "checkpoint": {"save_interval": SAVED, "save_final": False},
           "run": {"dir": str(tmp / "source")}}
    config = tmp / "source.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_cli("train", config)
    return {"config": config, "tmp": tmp,
            "checkpoint": tmp / "source" / "checkpoints" / f"iter_{SAVED:07d}",
            "losses": {i: v for i, v in _losses(tmp / "source").items() if i > SAVED}}


def test_padding_differs_between_the_layouts():
    assert (padded_vocab_size(VOCAB, 128, 2), padded_vocab_size(VOCAB, 128, 1)) == (4352, 4224)


def test_resume_at_tp1_follows_the_tp2_run(source):
    run_dir = source["tmp"] / "tp1"
    proc = run_cli("train", source["config"], "parallel.tp=1", "parallel.dp=2",
                   f"checkpoint.load={source['checkpoint']}", "checkpoint.save_interval=0",
                   f"run.dir={run_dir}")
    assert "padded to 4224 rows here, 4352 in the checkpoint (vocab 4200): padding rows " \
           "trimmed" in proc.stdout
    resumed = _losses(run_dir)
    assert resumed.keys() == source["losses"].keys() == set(range(SAVED + 1, LAST + 1))
    # megatron-core's cross entropy normalises over every row, padding included, so the two
    # models differ by the trimmed rows' share of the softmax: at most log(4352 / 4224) nats
    # while the padding logits are no larger than the real ones (measured: 0.027 at iteration
    # 6, shrinking as training pushes the padding logits down). Equal losses within 1e-4 would
    # need a loss that masks the padded vocabulary.
    bound = math.log(4352 / 4224)
    for it, loss in source["losses"].items():
        assert resumed[it] < loss and loss - resumed[it] < bound, \
            f"iteration {it}: {resumed[it]} at tp=1 vs {loss} at tp=2"


def test_reshard_to_tp1_keeps_every_real_row_and_trims_the_padding(source):
    tmp = source["tmp"]
    wide = tmp / "tp2_reshardable"  # the same state in parameter shapes, at TP=2's padding
    run_cli("reshard", "--input", source["checkpoint"], "--output", wide)
    narrow = tmp / "tp1_reshardable"
    run_cli("reshard", "--input", wide, "--output", narrow, "--tp", "1")
    a, b = CheckpointReader(wide), CheckpointReader(narrow)
    checked = 0
    for key in a.tensors:
        if not key.endswith(VOCAB_KEYS):
            assert torch.equal(a.read_full(key), b.read_full(key)), key
            continue
        before, after = a.read_full(key), b.read_full(key)
        assert before.shape[0] == 4352 and after.shape[0] == 4224, key
        assert torch.equal(after, before[:4224]), key
        checked += 1
    # weights, master weights and both moments of the embedding and the output layer
    assert checked == 8


def test_reshard_back_to_tp2_zero_pads_the_rows_the_padding_adds(source):
    from flagscale.train.reshard import reshard

    tmp = source["tmp"]
    narrow, back = tmp / "tp1_offline", tmp / "tp2_again"
    reshard(source["checkpoint"], narrow, tp=1, progress=False, log=lambda line: None)
    reshard(narrow, back, tp=2, progress=False, log=lambda line: None)
    a, b = CheckpointReader(narrow), CheckpointReader(back)
    padded = 0
    for key in a.tensors:
        before, after = a.read_full(key), b.read_full(key)
        if not key.endswith(VOCAB_KEYS):
            assert torch.equal(before, after), key
            continue
        assert before.shape[0] == 4224 and after.shape[0] == 4352, key
        assert torch.equal(after[:4224], before) and not after[4224:].any(), key
        padded += 1
    assert padded == 8

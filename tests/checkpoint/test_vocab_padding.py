"""A TP change that changes the vocabulary padding resumes and reshards instead of being refused.

vocab_size 4200 pads to 4352 rows at TP=2 (a multiple of 128 * 2), to 4224 at TP=1 and to 4608
at TP=4 (which the tiny model's two key/value groups cannot split). A run saved at TP=2 resumes
at TP=1 with DP=2, at PP=2 with virtual stages and, resharded, at TP=1 on one process, with the
losses of the uninterrupted run: the padded vocabulary is masked out of the logits, so the loss
does not depend on the padding. Every real row of the embedding and output layer (weights, fp32
master weights, both Adam moments) comes through bit for bit; padding rows are dropped or come
in as zeros.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flagscale.checkpoint.reader import CheckpointReader
from flagscale.config import padded_vocab_size
from tests.dist import run_cli, run_losses

VOCAB, SAVED, LAST = 4200, 5, 10
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """A TP=2 run with a 4,200-token vocabulary: its iteration-5 checkpoint, losses at 6-10."""
    tmp = tmp_path_factory.mktemp("vocab")
    cfg = {"model": {"preset": "tiny", "params_dtype": "fp32", "vocab_size": VOCAB},
           # Sequence parallel: the output layer gathers the sequence, then masks its vocab slice.
           "parallel": {"tp": 2, "sequence_parallel": True},
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
            "losses": {i: v for i, v in run_losses(tmp / "source").items() if i > SAVED}}


def test_padding_differs_between_the_layouts():
    assert [padded_vocab_size(VOCAB, 128, tp) for tp in (1, 2, 4)] == [4224, 4352, 4608]


def _resume(source, checkpoint: Path, name: str, *layout: str) -> str:
    """Resume ``checkpoint`` at ``layout``, check its losses follow the uninterrupted TP=2 run;
    return what the run printed."""
    run_dir = source["tmp"] / name
    proc = run_cli("train", source["config"], *layout, "parallel.sequence_parallel=false",
                   f"checkpoint.load={checkpoint}",
                   "checkpoint.save_interval=0", f"run.dir={run_dir}")
    resumed = run_losses(run_dir)
    assert resumed.keys() == source["losses"].keys() == set(range(SAVED + 1, LAST + 1))
    for it, loss in source["losses"].items():
        assert resumed[it] == pytest.approx(loss, rel=1e-4), \
            f"iteration {it}: {resumed[it]} at {' '.join(layout)} vs {loss} at tp=2"
    return proc.stdout


@pytest.mark.parametrize("layout", [("parallel.tp=1", "parallel.dp=2"),
                                    ("parallel.tp=1", "parallel.pp=2", "parallel.vpp=2")],
                         ids=["tp1_dp2", "pp2_vpp2"])
def test_resume_at_another_padding_follows_the_uninterrupted_run(source, layout):
    # The padded vocabulary is masked out of the logits, so 128 fewer padding rows change nothing.
    out = _resume(source, source["checkpoint"], "_".join(a.split(".")[-1] for a in layout),
                  *layout)
    assert "padded to 4224 rows here, 4352 in the checkpoint (vocab 4200): padding rows " \
           "trimmed" in out


def test_reshard_keeps_every_real_row_and_trims_or_zero_pads_the_padding(source):
    tmp = source["tmp"]
    wide = tmp / "tp2_reshardable"  # the same state in parameter shapes, at TP=2's padding
    run_cli("reshard", "--input", source["checkpoint"], "--output", wide)
    narrow = tmp / "tp1_reshardable"
    run_cli("reshard", "--input", wide, "--output", narrow, "--tp", "1")
    back = tmp / "tp2_again"  # zero-pads again
    run_cli("reshard", "--input", narrow, "--output", back, "--tp", "2")
    a, b, c = CheckpointReader(wide), CheckpointReader(narrow), CheckpointReader(back)
    checked = 0
    for key in a.tensors:
        if not key.endswith(VOCAB_KEYS):
            assert torch.equal(a.read_full(key), b.read_full(key)), key
            assert torch.equal(a.read_full(key), c.read_full(key)), key
            continue
        before, after, again = a.read_full(key), b.read_full(key), c.read_full(key)
        assert [t.shape[0] for t in (before, after, again)] == [4352, 4224, 4352], key
        # Masked out of the logits, the padding rows get no gradient: zero from initialisation
        # to the end, in the weights, the master weights and both moments.
        assert not before[VOCAB:].any(), key
        assert torch.equal(after, before[:4224]), key
        assert torch.equal(again, before), key  # the round trip is bitwise
        checked += 1
    # weights, master weights and both moments of the embedding and the output layer
    assert checked == 8
    # The trimmed checkpoint trains on in one process as the TP=2 run did.
    _resume(source, narrow, "tp1_one_process", "--nproc", "1", "parallel.tp=1")


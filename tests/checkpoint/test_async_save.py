"""checkpoint.async_save: checkpoints written in the background are complete, named and pointed
at by ``latest`` only once written, and resume exactly."""

from __future__ import annotations


import pytest
import yaml

from flagscale.checkpoint import read_run_state
from tests.dist import run_cli, run_losses


def test_background_saves_complete_and_resume_exactly(tmp_path, tiny_corpus, tiny_tokenizer):
    cfg = {"model": {"preset": "tiny", "params_dtype": "fp32"}, "parallel": {"dp": 2},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 64,
                     "iterations": 4, "lr": 2e-3, "min_lr": 2e-4, "warmup_iterations": 1,
                     "log_interval": 1, "seed": 7},
           "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer},
           "checkpoint": {"save_interval": 2, "async_save": True},
           "run": {"dir": str(tmp_path / "async")}}
    config = tmp_path / "async.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_cli("train", config)
    checkpoints = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", "iter_0000004",
                                                             "latest"]
    assert (checkpoints / "latest").read_text().strip() == "iter_0000004"
    for it in (2, 4):
        saved = checkpoints / f"iter_{it:07d}"
        assert (saved / "metadata.json").is_file() and (saved / "flagscale_config.yaml").is_file()
        assert read_run_state(saved)["iteration"] == it

    run_cli("train", config, f"checkpoint.load={checkpoints / 'iter_0000002'}",
            "checkpoint.save_interval=0", f"run.dir={tmp_path / 'resumed'}")
    expected, resumed = run_losses(tmp_path / "async"), run_losses(tmp_path / "resumed")
    assert resumed.keys() == {3, 4}
    for it in (3, 4):
        assert resumed[it] == pytest.approx(expected[it], rel=1e-6), it

"""A real 2-process tiny training run: its metrics.jsonl obeys the accounting identities."""

from __future__ import annotations

import json

import pytest
import yaml

from flagscale.metrics.report import flops_report
from flagscale.cli.main import main
from flagscale.config import load_config
from tests.dist import run_cli


def test_tiny_run_records_match_flops_of_its_config(tmp_path, tiny_corpus, tiny_tokenizer):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "parallel": {"dp": 2},
        "train": {"micro_batch_size": 4, "global_batch_size": 16, "seq_length": 128,
                  "iterations": 6, "log_interval": 2},
        "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer},
        "checkpoint": {"save_interval": 0},
        "run": {"dir": str(run_dir)}}))
    run_cli("train", config, "--nproc", "2")
    cfg = load_config(run_dir / "config.yaml")
    world_size = 2
    per_token = flops_report(cfg.model, cfg.train.seq_length, tp=cfg.parallel.tp)["flops_per_token"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["timed_steps"] == (1 if r["iteration"] == 2 else 2)  # step 1 is excluded
        assert r["tokens_per_sec_per_gpu"] * r["step_time_s"] * world_size == pytest.approx(
            cfg.train.global_batch_size * cfg.train.seq_length)
        assert r["tflops_per_gpu"] / r["tokens_per_sec_per_gpu"] == pytest.approx(per_token / 1e12)
        assert r["mfu"] is None  # a CPU has no peak in the table
        assert r["memory_gib"] > 0
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "plots" / "tokens_per_sec_per_gpu.png").stat().st_size > 10_000

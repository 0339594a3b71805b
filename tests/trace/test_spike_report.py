"""Real 2-process training runs whose loss honestly spikes or goes NaN (a learning rate far too
large): the run writes a trace report of that iteration naming its documents and each row's loss,
prints how to resume past it, and ``flagscale trace`` reproduces the report from the run's config.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from flagscale.cli.main import main
from flagscale.config import load_config
from flagscale.trace import SpikeDetector
from tests.dist import run_cli


def _run(tmp_path, corpus, tokenizer, parallel: dict, train: dict, trace: dict,
         save_interval: int = 0):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "parallel": parallel,
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 32,
                  "warmup_iterations": 0, "lr_decay_style": "constant", "log_interval": 1,
                  **train},
        "data": {"paths": [corpus], "tokenizer": tokenizer},
        "checkpoint": {"save_interval": save_interval}, "trace": trace,
        "run": {"dir": str(run_dir)}}))
    proc = run_cli("train", config, "--nproc", "2")
    metrics = {r["iteration"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    return run_dir, proc.stdout, metrics


def _report(run_dir, iteration):
    return [json.loads(line) for line in
            (run_dir / "traces" / f"iter_{iteration:07d}.jsonl").open(encoding="utf-8")]


def _row_losses(records):
    return {r["global_sample"]: r.get("loss") for r in records}


def test_loss_spike_writes_a_report_that_flagscale_trace_reproduces(tmp_path, tiny_corpus,
                                                                     tiny_tokenizer, capsys):
    # lr 1.0 (Adam moves every weight by ~1 per step): iteration 2's loss is several times
    # iteration 1's. A window of one makes iteration 1 the reference.
    run_dir, stdout, metrics = _run(tmp_path, tiny_corpus, tiny_tokenizer, {"dp": 2},
                                    {"lr": 1.0, "iterations": 2},
                                    {"window": 1, "spike_factor": 1.5})
    assert metrics[2]["loss"] > 1.5 * metrics[1]["loss"]
    report = _report(run_dir, 2)
    assert sorted((run_dir / "traces").iterdir()) == [run_dir / "traces" / "iter_0000002.jsonl"]
    losses = _row_losses(report)
    assert sorted(losses) == list(range(8, 16))  # iteration 2 reads global samples 8..15
    # The per-row losses are the ones the step averaged into its logged loss.
    assert sum(losses.values()) / 8 == pytest.approx(metrics[2]["loss"], rel=1e-6)
    assert {(r["dp_rank"], r["microbatch"], r["row"]) for r in report} == {
        (d, m, j) for d in range(2) for m in range(2) for j in range(2)}
    worst = max(losses, key=losses.get)
    line = next(x for x in stdout.splitlines() if x.startswith("flagscale trace: iteration 2"))
    assert str(run_dir / "traces" / "iter_0000002.jsonl") in line
    assert f"sample {worst} (loss {losses[worst]:.4f})" in line
    assert "checkpoint.load=null data.skip_iterations=[2]" in line

    assert main(["trace", str(run_dir / "config.yaml"), "--iteration", "2"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == report

    assert main(["trace", str(run_dir / "config.yaml"), "--iteration", "2", "--format",
                 "text"]) == 0
    text = capsys.readouterr().out
    assert f"sample {worst}  loss {losses[worst]:.4f}" in text
    assert report[0]["source"] + ":" + str(report[0]["line"]) in text

    beyond = run_cli("trace", run_dir / "config.yaml", "--iteration", "3", check=False)
    assert beyond.returncode == 1 and "Traceback" not in beyond.stderr
    assert "train.iterations=2" in beyond.stderr


def test_nan_with_the_loss_on_another_rank_than_the_writer(tmp_path, tiny_corpus,
                                                           tiny_tokenizer, capsys):
    # pp=2: the loss lives on rank 1, the writer is rank 0. lr 1e30 makes iteration 2's
    # backward overflow (non-finite gradient norm). The optimizer drops that update, so the
    # weights never turn NaN and no later loss is NaN. parallel.dp is left out of the config (the
    # world size decides it): tracing with that config reads it from the final checkpoint, while
    # the run's config.yaml records the resolved dp.
    run_dir, stdout, metrics = _run(tmp_path, tiny_corpus, tiny_tokenizer, {"pp": 2},
                                    {"lr": 1e30, "iterations": 3},
                                    {"spike_factor": 100.0},
                                    save_interval=3)
    assert math.isfinite(metrics[2]["loss"]) and metrics[2]["grad_norm"] is None
    overflow = _report(run_dir, 2)
    losses = _row_losses(overflow)
    assert sorted(losses) == list(range(8, 16))
    # The row losses computed on rank 1 are in the report rank 0 wrote.
    assert sum(losses.values()) / 8 == pytest.approx(metrics[2]["loss"], rel=1e-6)
    assert "iteration 2: gradient norm is nan" in stdout
    assert math.isfinite(metrics[3]["loss"]) and "loss is nan" not in stdout
    assert load_config(run_dir / "config.yaml").parallel.dp == 1
    assert load_config(tmp_path / "config.yaml").parallel.dp is None
    for config in (tmp_path / "config.yaml", run_dir / "config.yaml"):
        assert main(["trace", str(config), "--iteration", "2"]) == 0
        assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == overflow


def test_spike_detector_waits_for_a_full_window_and_uses_its_median():
    detector = SpikeDetector(factor=2.0, window=3, on_nan=True)
    assert [detector.check(x) for x in (10.0, 1.0, 1.2)] == [None, None, None]
    assert detector.check(2.3) is None          # median of (10, 1, 1.2) is 1.2: 2.3 < 2.4
    assert "median 1.2000" in detector.check(2.5)
    assert detector.check(float("inf")) == "loss is inf"
    assert SpikeDetector(2.0, 3, on_nan=False).check(float("nan")) is None

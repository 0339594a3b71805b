"""The Trainer and its callbacks on real gloo process groups: evaluation off the log interval,
callback order, a crash that still closes the loggers, and callback state across a resume."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import pytest

from flagscale.config import load_config, validate
from flagscale.errors import ConfigError
from flagscale.train.callbacks import (Callback, LoggerCallback, SpikeReportCallback,
                                       ThroughputCallback, build_callbacks)
from tests.dist import run_cli, run_distributed, tiny_config
from tests.metrics.test_metric_loggers import CONTRACT_KEYS, _wandb_records


def _config(tmp_path: Path, corpus: str, tokenizer: str, **sections) -> Path:
    base = {"parallel": {"dp": 2}, "train": {"iterations": 6}, "checkpoint": {"save_interval": 0}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_config(tmp_path / "config.yaml", corpus, tokenizer, tmp_path / "run", **base)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_evaluation_is_logged_when_eval_interval_is_coprime_to_log_interval(
        tmp_path, tiny_corpus, tiny_tokenizer):
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer,
                     train={"eval_interval": 3, "log_interval": 2, "eval_iterations": 1})
    stdout = run_cli("train", config, "--nproc", "2").stdout
    records = {r["iteration"]: r for r in _metrics(tmp_path / "run")}
    # Log iterations 2, 4, 6 plus evaluation iteration 3: a validation loss is logged at the
    # iteration it was measured, with the training metrics of the steps since the last record.
    assert sorted(records) == [2, 3, 4, 6]
    for iteration, record in records.items():
        assert CONTRACT_KEYS <= record.keys(), iteration
        assert ("valid_loss" in record) == (iteration in (3, 6)), iteration
    for iteration in (3, 6):
        assert 0 < records[iteration]["valid_loss"] < 20
        line = next(x for x in stdout.splitlines() if x.startswith(f"iter {iteration:>6d}/6"))
        assert f"valid_loss {records[iteration]['valid_loss']:.4f}" in line


class Recorder(Callback):
    """Appends (name, method, argument) to a shared list."""

    def __init__(self, name: str, priority: int, events: list):
        self.name, self.priority, self.events = name, priority, events

    def pre_train(self):
        self.events.append((self.name, "pre_train", None))

    def pre_step(self, iteration):
        self.events.append((self.name, "pre_step", iteration))

    def post_step(self, step):
        self.events.append((self.name, "post_step", step.iteration))

    def log_metrics(self, iteration, metrics):
        self.events.append((self.name, "log_metrics", iteration))

    def on_error(self, exc):
        self.events.append((self.name, "on_error", str(exc)))

    def close(self):
        self.events.append((self.name, "close", None))


class Boom(Callback):
    def post_step(self, step):
        if step.iteration == 2:
            raise RuntimeError("boom at iteration 2")


def _crash_worker(config: str) -> dict:
    from flagscale.train.trainer import Trainer

    events: list = []
    trainer = Trainer(load_config(config), callbacks=[
        Recorder("low", -50, events), Boom(), Recorder("high", 50, events)])
    with pytest.raises(RuntimeError, match="boom at iteration 2"):
        trainer.fit()
    return {"events": events, "order": [type(c).__name__ for c in trainer.callbacks]}


def test_callbacks_run_by_priority_and_a_crash_still_closes_the_loggers(
        tmp_path, tiny_corpus, tiny_tokenizer, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer,
                     metrics={"wandb": True, "wandb_project": "flagscale-test"})
    writer, other = run_distributed(_crash_worker, 2, str(config))

    # Higher priority first, in every method; throughput and loggers only on the writer rank.
    # The stop-signal callback runs last on every rank (it ends the loop after the others acted).
    assert writer["order"] == ["SpikeReportCallback", "Recorder", "Boom", "Recorder",
                               "ThroughputCallback", "LoggerCallback", "LoggerCallback",
                               "LoggerCallback", "StopOnSignalCallback"]
    assert other["order"] == ["SpikeReportCallback", "Recorder", "Boom", "Recorder",
                              "StopOnSignalCallback"]
    for result in (writer, other):
        high = [(m, a) for n, m, a in result["events"] if n == "high"]
        low = [(m, a) for n, m, a in result["events"] if n == "low"]
        assert high == [("pre_train", None), ("pre_step", 1), ("post_step", 1),
                        ("log_metrics", 1), ("pre_step", 2), ("post_step", 2),
                        ("on_error", "boom at iteration 2"), ("close", None)]
        # Boom (priority 0) raised before "low" (-50) saw iteration 2's post_step.
        assert low == [("pre_train", None), ("pre_step", 1), ("post_step", 1),
                       ("log_metrics", 1), ("pre_step", 2),
                       ("on_error", "boom at iteration 2"), ("close", None)]
        names = [n for n, m, a in result["events"] if (m, a) == ("post_step", 1)]
        assert names == ["high", "low"]

    # The crashed run kept its logged record and finished its wandb run, marked failed.
    assert [r["iteration"] for r in _metrics(tmp_path / "run")] == [1]
    run_file, = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(run_file)):
        assert time.monotonic() < deadline, "the crashed run's wandb run was never finished"
        time.sleep(0.2)
    exit_record = next(r.exit for r in _wandb_records(run_file)
                       if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == 1


def test_spike_window_survives_a_resume(tmp_path, tiny_corpus, tiny_tokenizer):
    # First run: iterations 1-2 fill a window of 2 and are saved; a factor of 100 reports nothing.
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer,
                     train={"iterations": 4, "stop_iteration": 2},
                     checkpoint={"save_interval": 2, "load": "auto"},
                     trace={"window": 2, "spike_factor": 100.0})
    run_cli("train", config)
    run_dir = tmp_path / "run"
    assert not (run_dir / "traces").exists()
    first = {r["iteration"]: r["loss"] for r in _metrics(run_dir)}
    # The resumed run reports any loss above half the window's median: only a window restored
    # from the checkpoint is full at iteration 3 (a fresh one would hold no loss yet).
    stdout = run_cli("train", config, "train.stop_iteration=null", "trace.spike_factor=0.5").stdout
    assert (run_dir / "traces" / "iter_0000003.jsonl").is_file()
    line = next(x for x in stdout.splitlines() if x.startswith("flagscale trace: iteration 3"))
    median = float(re.search(r"median ([0-9.]+) of the last 2 iterations", line).group(1))
    assert median == pytest.approx((first[1] + first[2]) / 2, abs=1e-4)


def _no_validation_split_worker(config: str) -> str:
    from flagscale.train.trainer import Trainer

    with pytest.raises(ConfigError) as caught:
        Trainer(load_config(config)).fit()
    return str(caught.value)


def test_evaluation_without_a_validation_split_is_a_config_error(tmp_path, tiny_corpus,
                                                                  tiny_tokenizer):
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer, parallel={"dp": 1},
                     train={"eval_interval": 2}, data={"split": "100,0,0"})
    message, = run_distributed(_no_validation_split_worker, 1, str(config))
    assert "train.eval_interval=2" in message and "data.split" in message


def test_only_the_writer_rank_builds_throughput_and_loggers(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", f"run.dir={tmp_path}", "train.eval_interval=5",
                             "checkpoint.save_interval=5"])
    layout = validate(cfg, 2, check_paths=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # building prints and warns nothing on any rank
        other = build_callbacks(cfg, layout, tmp_path, is_writer=False)
        writer = build_callbacks(cfg, layout, tmp_path, is_writer=True)
    assert not any(isinstance(c, (ThroughputCallback, LoggerCallback)) for c in other)
    assert [type(c) for c in writer[:len(other)]] == [type(c) for c in other]
    assert isinstance(other[0], SpikeReportCallback)
    assert sum(isinstance(c, LoggerCallback) for c in writer) == 2  # console, metrics.jsonl
    assert any(isinstance(c, ThroughputCallback) for c in writer)

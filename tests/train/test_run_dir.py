"""One run per run directory: the lock, the resume that must continue the same experiment, and
the config history that lets ``flagscale trace`` use the config that trained an iteration."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import yaml

from flagscale.config import load_config
from flagscale.errors import ConfigError
from flagscale.trace import trace_iterations
from flagscale.train.run_dir import RunDirLock
from tests.dist import run_cli
from tests.launch.test_local import write_config


def _lock_of(tmp_path, pid: int) -> None:
    (tmp_path / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": time.time(),
         "command": "flagscale train x"}))


def test_a_live_lock_is_refused_naming_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(tmp_path, holder.pid)
        with pytest.raises(ConfigError) as caught:
            RunDirLock(tmp_path).acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(caught.value)
        assert str(tmp_path / ".lock") in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone now: the lock is stale and taken over, with a note.
    lock = RunDirLock(tmp_path)
    note = lock.acquire()
    assert f"took over the stale lock {tmp_path / '.lock'}" in note
    assert f"process {holder.pid} is not running" in note
    assert json.loads((tmp_path / ".lock").read_text())["pid"] != holder.pid
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_second_run_in_a_locked_directory_fails_before_starting(tmp_path, tiny_corpus,
                                                                   tiny_tokenizer):
    config = write_config(tmp_path, tiny_corpus, tiny_tokenizer)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(tmp_path / "run", holder.pid)
        proc = run_cli("train", config, "--nproc", "2", check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    assert "is in use by another run" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "config.yaml").exists()


def test_resume_refuses_another_experiment_and_keeps_the_config_of_each_iteration(
        tmp_path, tiny_corpus, tiny_tokenizer):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, tiny_corpus, tiny_tokenizer,
                          train={"iterations": 4, "stop_iteration": 2},
                          checkpoint={"save_interval": 2})
    run_cli("train", config, "--nproc", "1")
    first = (run_dir / "config.yaml").read_text()

    # Another learning rate and seed in the finished run's directory: refused, naming the keys,
    # before anything is written.
    refused = run_cli("train", config, "--nproc", "1", "train.lr=0.001", "train.seed=8",
                      check=False)
    assert refused.returncode == 1
    assert "train.lr: 0.0003 -> 0.001" in refused.stderr
    assert "train.seed: 7 -> 8" in refused.stderr and "run.allow_config_change=true" in refused.stderr
    assert (run_dir / "config.yaml").read_text() == first
    # Starting over the run's checkpoints would overwrite them.
    fresh = run_cli("train", config, "--nproc", "1", "checkpoint.load=null", check=False)
    assert fresh.returncode == 1 and "would overwrite them" in fresh.stderr

    # Keys a resume may change (length, intervals) need nothing; others need the explicit key.
    run_cli("train", config, "--nproc", "1", "train.stop_iteration=null", "train.seed=8",
            "run.allow_config_change=true")
    kept = run_dir / "config.2.yaml"
    assert kept.read_text() == first
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == 8

    # The trace of iteration 1 (trained with seed 7) uses the kept config, iteration 3 the new.
    traced = subprocess.run([sys.executable, "-m", "flagscale", "trace", str(run_dir / "config.yaml"),
                             "--iteration", "1", "--to", "3"], capture_output=True, text=True,
                            check=True).stdout
    records = [json.loads(line) for line in traced.splitlines()]
    by_config = {
        1: list(trace_iterations(load_config(kept), 1)),
        3: list(trace_iterations(load_config(run_dir / "config.yaml"), 3)),
    }
    for iteration, expected in by_config.items():
        got = [r for r in records if r["iteration"] == iteration]
        assert [(r["document"], r["token_start"]) for r in got] == \
            [(r["document"], r["token_start"]) for r in expected]
    # Seed 8 would have fed other samples at iteration 1: the kept config matters.
    other = load_config(run_dir / "config.yaml", [f"run.dir={tmp_path / 'elsewhere'}",
                                                 "parallel.dp=1"])
    assert [r["document"] for r in trace_iterations(other, 1)] != \
        [r["document"] for r in records if r["iteration"] == 1]

"""``flagscale train --nproc N`` and its workers as one unit: a signal to the launcher stops every
worker, a ``kill -9`` of the launcher's process group leaves no process of the run behind
(checkpoint writers included), and an error inside the workers prints one paragraph."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flagscale.platform.lifetime import EXIT_REQUEUE
from tests.dist import run_cli, tiny_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="parent-death signals are Linux-only")


def write_config(tmp_path: Path, corpus: str, tokenizer: str, **sections) -> Path:
    base = {"train": {"iterations": 200}, "checkpoint": {"save_interval": 0, "load": "auto"},
            "trace": {"enabled": False}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_config(tmp_path / "config.yaml", corpus, tokenizer, tmp_path / "run", **base)


def start_train(config: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``flagscale train CONFIG --nproc 2`` as a user starts it, leading its own process group."""
    return subprocess.Popen([sys.executable, "-m", "flagscale", "train", str(config), "--nproc",
                             "2", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)


def logged_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()
            if line.endswith("}")]


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def assert_all_gone(processes: list[psutil.Process], within: float) -> None:
    _, alive = psutil.wait_procs(processes, timeout=within)
    survivors = [f"{p.pid}: {' '.join(p.cmdline())[:150]}" for p in alive]
    for p in alive:
        p.kill()
    assert not survivors, "processes of the run outlived it:\n" + "\n".join(survivors)


def test_sigterm_to_the_launcher_stops_every_worker(tmp_path, tiny_corpus, tiny_tokenizer):
    run_dir = tmp_path / "run"
    proc = start_train(write_config(tmp_path, tiny_corpus, tiny_tokenizer))
    wait_for(lambda: len(logged_iterations(run_dir)) >= 2, "iteration 2", proc)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert len(descendants) >= 2
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    # The workers finished their step, saved it, and stopped; the launcher waited for them.
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]
    assert_all_gone(descendants, within=5)
    logged = logged_iterations(run_dir)
    assert logged[-1] < 200
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{logged[-1]:07d}"
    time.sleep(1)
    assert logged_iterations(run_dir) == logged  # nothing trains on
    assert not (run_dir / ".lock").exists()


def test_kill_9_of_the_launcher_group_leaves_no_process_behind(tmp_path, tiny_corpus,
                                                               tiny_tokenizer):
    run_dir = tmp_path / "run"
    # A save every iteration: megatron-core's checkpoint writer processes come and go all along.
    proc = start_train(write_config(tmp_path, tiny_corpus, tiny_tokenizer,
                                    checkpoint={"save_interval": 1}))
    wait_for(lambda: len(logged_iterations(run_dir)) >= 3, "iteration 3", proc)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    # The workers, and the results-queue server megatron-core's writer uses (a spawned Python).
    assert any("multiprocessing" in " ".join(p.cmdline()) for p in descendants), \
        [" ".join(p.cmdline())[:120] for p in descendants]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)  # not its output: a surviving worker would hold the pipe open
    assert_all_gone(descendants, within=5)
    proc.stdout.close()
    # Nothing the workers fork after this snapshot survives either: no process names the run.
    time.sleep(1)
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if str(run_dir) in " ".join(p.info["cmdline"] or [])
                 or str(tmp_path / "config.yaml") in " ".join(p.info["cmdline"] or [])]
    assert_all_gone(leftovers, within=0.1)


def test_an_error_inside_the_workers_is_printed_once_with_its_exit_code(tmp_path, tiny_corpus,
                                                                        tiny_tokenizer):
    # A directory that exists but holds no checkpoint passes the launcher's checks and fails in
    # every worker, when it resumes.
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    config = write_config(tmp_path, tiny_corpus, tiny_tokenizer,
                          checkpoint={"load": str(not_a_checkpoint)})
    proc = run_cli("train", config, "--nproc", "2", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert output.count(f"{not_a_checkpoint} is not a checkpoint") == 1, output[-3000:]
    assert "flagscale train: error:" in proc.stderr
    for noise in ("ChildFailedError", "Traceback", "Root Cause", "torch.distributed"):
        assert noise not in output, output[-3000:]
    # A failed attempt leaves no config.yaml claiming what the run trains.
    assert not (tmp_path / "run" / "config.yaml").exists()

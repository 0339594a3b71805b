"""Fault injection: what a cluster does to a run while it saves, and what users do to its files.

- kill -9 of a training worker at random points of a save, repeated: ``latest`` always names a
  complete checkpoint, no directory named like a checkpoint is ever incomplete (``keep_last``
  renames before it deletes), and ``checkpoint.load=auto`` resumes and trains on;
- a full disk (a small tmpfs, where this machine lets the test mount one): "disk full" with the
  path and the sizes, the partial save removed, ``latest`` still naming the previous checkpoint;
- a damaged newest checkpoint (deleted or truncated shard, metadata without shards, random bytes
  in ``latest``...): ``checkpoint.load=auto`` falls back to the newest complete one with a warning
  naming the damage, and an explicit load names the damaged file.

The number of cases tried is printed at the end of the module.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from flagscale.checkpoint import (checkpoint_problem, latest_checkpoint, resolve_checkpoint)
from flagscale.errors import CheckpointError
from tests.checkpoint.conftest import run_config
from tests.dist import run_cli

KILLS = 10
"""kill -9 repetitions (each one start of a 2-process run)."""

TRIED: Counter = Counter()
"""Fault cases tried in this module, by kind."""


@pytest.fixture(scope="module", autouse=True)
def _print_cases_tried(request):
    yield
    line = (f"fault injection: {sum(TRIED.values())} cases tried ("
            f"{', '.join(f'{n} {kind}' for kind, n in TRIED.items())})")
    # Printed past pytest's output capture, so it shows in every CI log.
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{line}")


def _named_latest(checkpoints: Path):
    pointer = checkpoints / "latest"
    return checkpoints / pointer.read_text().strip() if pointer.is_file() else None


def _assert_intact(checkpoints: Path, what: str) -> None:
    """``latest`` names a complete checkpoint, and so does every ``iter_`` directory name."""
    latest = _named_latest(checkpoints)
    assert latest is None or checkpoint_problem(latest) is None, \
        f"{what}: latest names {latest.name}: {checkpoint_problem(latest)}"
    for path in checkpoints.glob("iter_???????"):
        assert checkpoint_problem(path) is None, f"{what}: {checkpoint_problem(path)}"


def _wait_for(predicate, timeout: float, what: str, launcher, log: Path):
    deadline = time.monotonic() + timeout
    while not predicate():
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            raise AssertionError(f"{what} never happened (launcher exit code "
                                 f"{launcher.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.01)


def test_kill_9_at_random_points_of_saves_never_breaks_latest(tmp_path, tiny_corpus,
                                                              tiny_tokenizer):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    config = run_config(tmp_path / "config.yaml", tiny_corpus, tiny_tokenizer, run_dir,
                        train={"iterations": 1000}, checkpoint={"keep_last": 2})
    rng = random.Random(2024)
    log = tmp_path / "launcher.log"
    save_s = None
    for attempt in range(KILLS):
        started = time.time()
        with open(log, "w") as out:
            launcher = subprocess.Popen([sys.executable, "-m", "flagscale", "train", str(config)],
                                        stdout=out, stderr=subprocess.STDOUT)

        def saving() -> bool:
            return any(p.stat().st_ctime >= started for p in checkpoints.glob("*.partial")
                       if p.exists())

        _wait_for(saving, 300, "a save", launcher, log)
        if save_s is None:  # let the first save finish: something to resume from, and its time
            begun = time.time()
            _wait_for(lambda: (checkpoints / "latest").is_file(), 300, "a first save",
                      launcher, log)
            save_s, started = time.time() - begun, time.time()
            _wait_for(saving, 300, "a second save", launcher, log)
        # Anywhere in the save (writing shards, renaming, writing latest) or just past it.
        time.sleep(rng.uniform(0.0, 1.25 * save_s))
        # The launcher runs torchrun's agent itself: the workers are its children.
        workers = [p for p in psutil.Process(launcher.pid).children()
                   if str(config) in " ".join(p.cmdline())]
        assert workers, f"no worker processes to kill:\n{log.read_text()[-4000:]}"
        everything = psutil.Process(launcher.pid).children(recursive=True)
        victim = rng.choice(workers)
        victim.send_signal(signal.SIGKILL)
        try:
            launcher.wait(timeout=120)
        finally:
            # Whether every process of a run dies with it is the launcher's own test; here
            # nothing may linger into the next attempt.
            for process in everything:
                if process.is_running():
                    process.kill()
        TRIED["kill -9 during a save"] += 1
        print(f"kill {attempt + 1}: latest {_named_latest(checkpoints)}, first save took "
              f"{save_s:.2f}s")
        _assert_intact(checkpoints, f"kill {attempt + 1}")

    resume_from = _named_latest(checkpoints)
    iteration = int(resume_from.name[len("iter_"):])
    proc = run_cli("train", config, f"train.stop_iteration={iteration + 1}")
    assert f"resuming at iteration {iteration}" in proc.stdout
    assert _named_latest(checkpoints).name == f"iter_{iteration + 1:07d}"
    _assert_intact(checkpoints, "the resumed run")
    # keep_last=2, and the background deletion was joined before the run exited.
    assert len(list(checkpoints.glob("iter_???????"))) == 2
    assert not list(checkpoints.glob("*.deleting"))
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert f'"iteration": {iteration + 1},' in records[-1]


def test_a_full_disk_says_so_and_removes_the_partial_save(tmp_path, tiny_corpus, tiny_tokenizer):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root, and this test runs as "
                    f"uid {os.geteuid()}")
    # 40 MiB: the tiny run's first checkpoint (about 28 MiB) fits, the second does not.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a small tmpfs to fill "
                    f"({mounted.stderr.strip() or mounted.returncode})")
    try:
        checkpoints = mount / "run" / "checkpoints"
        config = run_config(tmp_path / "config.yaml", tiny_corpus, tiny_tokenizer, mount / "run",
                            train={"iterations": 3})
        proc = run_cli("train", config, check=False)
        TRIED["full disk"] += 1
        assert proc.returncode != 0
        message = re.search(r"Disk full while saving .*", proc.stderr)
        assert message, proc.stderr[-4000:]
        message = message.group(0)
        assert str(checkpoints / "iter_0000002.partial") in message
        assert re.search(r"the previous checkpoint iter_0000001 takes [\d.]+ MiB, and "
                         rf"{re.escape(str(checkpoints))} has [\d.]+ MiB free", message)
        assert "latest still names iter_0000001" in message
        assert not list(checkpoints.glob("*.partial"))
        assert _named_latest(checkpoints) == checkpoints / "iter_0000001"
        _assert_intact(checkpoints, "after the full disk")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _delete_shard(newest: Path) -> str:
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.unlink()
    return rf"shard {re.escape(str(shard))} is missing"


def _truncate_shard(newest: Path) -> str:
    shard = sorted(newest.glob("*.distcp"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return rf"shard {re.escape(str(shard))} is truncated"


def _metadata_without_shards(newest: Path) -> str:
    for shard in newest.glob("*.distcp"):
        shard.unlink()
    return rf"shard {re.escape(str(newest))}/__0_0\.distcp is missing"


def _garble_torch_metadata(newest: Path) -> str:
    (newest / ".metadata").write_bytes(os.urandom(200))
    return rf"{re.escape(str(newest / '.metadata'))} is missing or unreadable"


DAMAGED_NEWEST = {"deleted shard": _delete_shard, "truncated shard": _truncate_shard,
                  "metadata without shards": _metadata_without_shards,
                  "unreadable .metadata": _garble_torch_metadata}


@pytest.mark.parametrize("damage", list(DAMAGED_NEWEST))
def test_a_damaged_newest_checkpoint_falls_back_or_is_named(damage, run_copy):
    checkpoints = run_copy / "checkpoints"
    newest = checkpoints / "iter_0000002"
    problem = DAMAGED_NEWEST[damage](newest)
    TRIED["damaged newest checkpoint"] += 1
    with pytest.warns(UserWarning, match=rf"latest names iter_0000002, but {problem}.*; using "
                                         rf"iter_0000001, the newest complete checkpoint"):
        assert latest_checkpoint(checkpoints) == checkpoints / "iter_0000001"
    with pytest.raises(CheckpointError, match=rf"Checkpoint {re.escape(str(newest))} is "
                                              rf"incomplete: {problem}"):
        resolve_checkpoint(newest)


@pytest.mark.parametrize("content", [os.urandom(64), b"iter_12\n", b"../../etc\n", b""],
                         ids=["random bytes", "short name", "path", "empty"])
def test_a_damaged_latest_is_ignored_with_a_warning(content, run_copy):
    checkpoints = run_copy / "checkpoints"
    (checkpoints / "latest").write_bytes(content)
    TRIED["damaged latest"] += 1
    with pytest.warns(UserWarning, match=r"latest (is unreadable \(UnicodeDecodeError\)|holds "
                                         r".*, not an iter_XXXXXXX name); using iter_0000002"):
        assert latest_checkpoint(checkpoints) == checkpoints / "iter_0000002"


def test_auto_resume_falls_back_past_a_deleted_shard(run_copy, tmp_path, tiny_corpus,
                                                    tiny_tokenizer):
    checkpoints = run_copy / "checkpoints"
    shard = sorted((checkpoints / "iter_0000002").glob("*.distcp"))[0]
    shard.unlink()
    config = run_config(tmp_path / "config.yaml", tiny_corpus, tiny_tokenizer, run_copy,
                        train={"iterations": 3})
    TRIED["damaged newest checkpoint, real resume"] += 1
    proc = run_cli("train", config)
    assert (f"latest names iter_0000002, but shard {shard} is missing; using iter_0000001, "
            f"the newest complete checkpoint.") in proc.stderr
    assert "resuming at iteration 1" in proc.stdout
    assert _named_latest(checkpoints).name == "iter_0000003"
    _assert_intact(checkpoints, "after the resume")  # iteration 2 was saved again, whole


def test_an_explicit_load_of_a_truncated_shard_names_it(run_copy, tmp_path, tiny_corpus,
                                                       tiny_tokenizer):
    newest = run_copy / "checkpoints" / "iter_0000002"
    shard = sorted(newest.glob("*.distcp"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(100)
    config = run_config(tmp_path / "config.yaml", tiny_corpus, tiny_tokenizer,
                        tmp_path / "other_run", checkpoint={"load": str(newest)})
    TRIED["damaged explicit checkpoint, real load"] += 1
    proc = run_cli("train", config, check=False)
    assert proc.returncode != 0
    assert f"Checkpoint {newest} is incomplete: shard {shard} is truncated (100 bytes" \
        in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: Checkpoint")[0][-200:]

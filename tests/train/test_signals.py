"""A stop signal in the middle of a run: every rank stops after the same step, a complete
checkpoint of that step is saved (a second signal during the save changes nothing), the run exits
with the requeue status, and the resumed run trains exactly what an uninterrupted run does."""

from __future__ import annotations

import signal

import pytest

from flagscale.checkpoint import read_run_state
from flagscale.platform.lifetime import EXIT_REQUEUE
from tests.dist import run_cli, run_losses
from tests.launch.test_local import logged_iterations, start_train, wait_for, write_config

ITERATIONS = 24


def test_sigusr1_saves_after_the_step_exits_for_requeue_and_resumes_exactly(
        tmp_path, tiny_corpus, tiny_tokenizer):
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    config = write_config(tmp_path, tiny_corpus, tiny_tokenizer,
                          train={"iterations": ITERATIONS}, parallel={"dp": 2})
    run_cli("train", config, f"run.dir={straight_dir}")
    straight = run_losses(straight_dir)

    proc = start_train(config, f"run.dir={stopped_dir}")
    wait_for(lambda: len(logged_iterations(stopped_dir)) >= 3, "iteration 3", proc)
    seen = logged_iterations(stopped_dir)[-1]
    proc.send_signal(signal.SIGUSR1)
    # The second signal lands while the workers stop and save: acknowledged, nothing else.
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]

    stopped_at = logged_iterations(stopped_dir)[-1]
    # The step running when the signal came (or, on a rank that saw it late, the next one).
    assert seen <= stopped_at <= seen + 2 < ITERATIONS, (seen, stopped_at)
    assert f"stopping on SIGUSR1 after iteration {stopped_at}: saving a checkpoint" in output
    checkpoint = stopped_dir / "checkpoints" / f"iter_{stopped_at:07d}"
    assert (stopped_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert read_run_state(checkpoint)["iteration"] == stopped_at
    assert not list((stopped_dir / "checkpoints").glob("*.partial"))

    resumed = run_cli("train", config, f"run.dir={stopped_dir}")
    assert f"resuming at iteration {stopped_at}" in resumed.stdout
    losses = run_losses(stopped_dir)
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    for iteration in range(1, ITERATIONS + 1):
        assert losses[iteration] == pytest.approx(straight[iteration], rel=1e-6), iteration

"""Layout parity and exact resume, through the real CLI on real gloo process groups.

The same tiny model, seed and data must give the same per-iteration losses whatever the layout:
flagscale initialises weights layout-invariantly and feeds every layout the same global samples,
so any difference would be a parallelism bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.dist import run_cli

ITERATIONS = 4


def _config(tmp_path: Path, corpus: str, tokenizer: str, name: str, **sections) -> Path:
    cfg = {
        "model": {"preset": "tiny", "params_dtype": "fp32"},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 64,
                  "iterations": ITERATIONS, "lr": 2e-3, "min_lr": 2e-4, "warmup_iterations": 1,
                  "log_interval": 1, "seed": 7},
        "data": {"paths": [corpus], "tokenizer": tokenizer},
        "checkpoint": {"save_interval": 0},
        "run": {"dir": str(tmp_path / name)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in _metrics(run_dir)}


def _assert_close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for it in expected:
        rel = abs(actual[it] - expected[it]) / abs(expected[it])
        assert rel < rtol, f"{what}: iteration {it} loss {actual[it]} vs {expected[it]} (rel {rel:.2e})"


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("parity")
    run_cli("train", _config(tmp, tiny_corpus, tiny_tokenizer, "single"), "--nproc", "1")
    losses = _losses(tmp / "single")
    assert len(losses) == ITERATIONS
    assert losses[ITERATIONS] < losses[1], "the tiny model should learn within a few steps"
    return losses


@pytest.mark.parametrize("layout", [
    {"tp": 2},
    {"tp": 2, "sequence_parallel": True},
    {"pp": 2},
    {"pp": 2, "vpp": 2},
    {"dp": 2},
    # An uneven pipeline split: 1 layer on the first stage, 3 on the last.
    {"pp": 2, "num_layers_in_first_pipeline_stage": 1},
    # Megatron-LM's GPU settings: gradient reduction and parameter gathers overlapped through the
    # schedule's no_sync/grad_sync hooks and DDP's forward pre-hooks.
    {"dp": 2, "overlap_grad_reduce": True, "overlap_param_gather": True},
], ids=lambda layout: "-".join(f"{k}{v}" for k, v in layout.items()))
def test_two_process_layouts_match_single_process(layout, tmp_path, tiny_corpus, tiny_tokenizer,
                                                 single_process_losses):
    cfg = _config(tmp_path, tiny_corpus, tiny_tokenizer, "run", parallel=layout)
    run_cli("train", cfg, "--nproc", "2")
    _assert_close(_losses(tmp_path / "run"), single_process_losses, 1e-4, f"layout {layout}")


@pytest.mark.parametrize("overlap", [
    {},
    # Megatron-LM's GPU settings with the distributed optimizer (flagscale's default): the
    # reduce-scatter in the backward pass, the parameter all-gather in the next forward pass,
    # so a checkpoint is taken between the two (finish_param_sync) and resumes exactly.
    {"overlap_grad_reduce": True, "overlap_param_gather": True, "distributed_optimizer": True},
], ids=lambda overlap: "overlap" if overlap else "plain")
def test_resume_reproduces_uninterrupted_run(overlap, tmp_path, tiny_corpus, tiny_tokenizer):
    common = dict(train={"iterations": 10}, parallel={"dp": 2, **overlap})
    run_cli("train", _config(tmp_path, tiny_corpus, tiny_tokenizer, "straight", **common))
    straight = _losses(tmp_path / "straight")

    stopped = _config(tmp_path, tiny_corpus, tiny_tokenizer, "resumed", **common,
                      checkpoint={"save_interval": 5, "load": "auto"})
    run_cli("train", stopped, "train.stop_iteration=5")
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000005"
    run_cli("train", stopped)
    resumed = _losses(tmp_path / "resumed")

    _assert_close({i: resumed[i] for i in range(6, 11)}, {i: straight[i] for i in range(6, 11)},
                  1e-6, "resumed run")
    grad_norms = {r["iteration"]: r["grad_norm"] for r in _metrics(tmp_path / "straight")}
    for record in _metrics(tmp_path / "resumed"):
        if record["iteration"] > 5:
            assert record["grad_norm"] == pytest.approx(grad_norms[record["iteration"]], rel=1e-6)
    assert (checkpoints / "latest").read_text().strip() == "iter_0000010"
    assert [r["iteration"] for r in _metrics(tmp_path / "resumed")] == list(range(1, 11))
    assert yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["train"][
        "iterations"] == 10

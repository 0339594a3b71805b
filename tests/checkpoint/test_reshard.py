"""Resuming at another TP/PP/DP layout, and ``flagscale reshard``, on real gloo process groups.

One tiny run at dp=2 saves iteration 5 and continues to 8; its losses at 6-8 are the reference a
resume at any other layout must reproduce. Adam moments and fp32 master weights are compared
tensor for tensor, read offline from the source and the resharded checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flagscale.checkpoint import CheckpointMeta, read_run_state
from flagscale.checkpoint.meta import check_resumable
from flagscale.checkpoint.output import MARKER, write_marker
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.config import ParallelDims
from flagscale.errors import CheckpointError, ConfigError, FlagScaleError, OutputError
from flagscale.train.reshard import reshard, resave
from tests.dist import run_cli, run_distributed

SAVED, LAST = 5, 8


def _config(tmp: Path, corpus: str, tokenizer: str) -> Path:
    cfg = {"model": {"preset": "tiny", "params_dtype": "fp32"},
           "parallel": {"dp": 2},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 64,
                     "iterations": LAST, "lr": 2e-3, "min_lr": 2e-4, "warmup_iterations": 1,
                     "log_interval": 1, "seed": 7},
           "data": {"paths": [corpus], "tokenizer": tokenizer},
           "checkpoint": {"save_interval": SAVED, "save_final": False},
           "run": {"dir": str(tmp / "source")}}
    path = tmp / "source.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """A dp=2 run: its iteration-5 checkpoint and its losses at 6-8 (the continued reference)."""
    tmp = tmp_path_factory.mktemp("reshard")
    config = _config(tmp, tiny_corpus, tiny_tokenizer)
    run_cli("train", config)
    return {"config": config, "tmp": tmp,
            "checkpoint": tmp / "source" / "checkpoints" / f"iter_{SAVED:07d}",
            "losses": {i: loss for i, loss in _losses(tmp / "source").items() if i > SAVED}}


def _resume(source: dict, name: str, checkpoint: Path, *layout: str) -> dict[int, float]:
    run_dir = source["tmp"] / name
    run_cli("train", source["config"], *layout, f"checkpoint.load={checkpoint}",
            "checkpoint.save_interval=0", f"run.dir={run_dir}")
    return _losses(run_dir)


def _assert_same_losses(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys() == set(range(SAVED + 1, LAST + 1)), what
    for it, loss in expected.items():
        assert actual[it] == pytest.approx(loss, rel=1e-5), f"{what}: iteration {it}"


def _assert_same_state(resharded: Path, original: Path) -> None:
    """Model weights, fp32 master weights and both Adam moments, bit for bit."""
    a, b = CheckpointReader(original), CheckpointReader(resharded)
    assert sorted(a.tensors) == sorted(b.tensors)
    kinds = {key.split(".")[2] for key in a.tensors if key.startswith("optimizer.state.")}
    assert kinds == {"param", "exp_avg", "exp_avg_sq"}
    for key in a.tensors:
        assert torch.equal(a.read_full(key), b.read_full(key)), key
    before, after = read_run_state(original), read_run_state(resharded)
    for key in ("iteration", "consumed_samples", "scheduler"):
        assert after[key] == before[key], key
    steps = {g["step"] for g in after["optimizer"]["optimizer"]["param_groups"]}
    assert steps == {float(SAVED)}


def test_resume_at_tp2_matches_continuing_at_dp2(source):
    resumed = _resume(source, "tp2", source["checkpoint"], "parallel.tp=2", "parallel.dp=1")
    _assert_same_losses(resumed, source["losses"], "resumed at tp=2")


def test_reshard_to_pp2_keeps_optimizer_state_and_resumes_exactly(source):
    out = source["tmp"] / "pp2"
    proc = run_cli("reshard", "--input", source["checkpoint"], "--output", out, "--pp", "2")
    assert ("tp=1 pp=1 dp=2 (fully_reshardable) -> tp=1 pp=2 dp=1 (fully_reshardable); 9 model "
            "tensors, 27 optimizer state tensors") in proc.stdout
    _assert_same_state(out, source["checkpoint"])
    assert read_run_state(out)["flagscale"]["layout"] == {"tp": 1, "pp": 2, "cp": 1, "dp": 1,
                                                          "vpp": None}
    assert CheckpointMeta.from_common(read_run_state(out)).dims == ParallelDims(tp=1, pp=2, dp=1)
    assert yaml.safe_load((out / "flagscale_config.yaml").read_text())["parallel"]["pp"] == 2
    resumed = _resume(source, "pp2_run", out, "parallel.pp=2", "parallel.dp=1")
    _assert_same_losses(resumed, source["losses"], "resharded to pp=2")


def test_dp_reshardable_checkpoint_reshards_to_tp2(source):
    tmp = source["tmp"]
    # The same state saved in megatron-core's bucket-space format (Megatron-LM's default).
    run_distributed(resave, 2, source["checkpoint"], tmp / "dp_format",
                    ParallelDims(tp=1, pp=1, dp=2), "dp_reshardable")
    dp_checkpoint = tmp / "dp_format" / f"iter_{SAVED:07d}"
    common = read_run_state(dp_checkpoint)
    with pytest.raises(CheckpointError, match="flagscale reshard --input"):
        check_resumable(dp_checkpoint, common, ParallelDims(tp=2, pp=1, dp=1))
    check_resumable(dp_checkpoint, common, ParallelDims(tp=1, pp=1, dp=2))

    out = tmp / "dp_to_tp2"
    proc = run_cli("reshard", "--input", dp_checkpoint, "--output", out, "--tp", "2")
    assert "tp=1 pp=1 dp=2 (dp_reshardable) -> tp=2 pp=1 dp=1 (fully_reshardable)" in proc.stdout
    _assert_same_state(out, source["checkpoint"])
    resumed = _resume(source, "dp_to_tp2_run", out, "parallel.tp=2", "parallel.dp=1")
    _assert_same_losses(resumed, source["losses"], "dp_reshardable resharded to tp=2")


def test_bad_target_layout_fails_before_any_work(source):
    out = source["tmp"] / "bad"
    proc = run_cli("reshard", "--input", source["checkpoint"], "--output", out, "--tp", "3",
                   check=False)
    assert proc.returncode == 1
    assert "Target layout tp=3 pp=1 dp=1" in proc.stderr
    assert "model.num_attention_heads (4) % parallel.tp (3) = 1" in proc.stderr
    with pytest.raises(ConfigError, match=r"global_batch_size \(8\) % \(micro_batch_size \(2\) "
                                          r"\* dp \(3\)\)"):
        reshard(source["checkpoint"], out, dp=3)
    assert not out.exists()


def test_output_is_refused_when_occupied_or_overlapping(source):
    out = source["tmp"] / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FlagScaleError, match=f"is not empty and it has no {MARKER}"):
        reshard(source["checkpoint"], out, tp=2)
    with pytest.raises(OutputError, match="replaces only its own earlier output, --overwrite or "
                                          "not"):
        reshard(source["checkpoint"], out, tp=2, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    write_marker(out, "reshard", [source["checkpoint"]])
    with pytest.raises(FlagScaleError, match="not empty .*Pass --overwrite"):
        reshard(source["checkpoint"], out, tp=2)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    with pytest.raises(OutputError, match="overlaps --input"):
        reshard(source["checkpoint"], source["checkpoint"].parent, tp=2, overwrite=True)


def test_failed_reshard_leaves_no_partial_output(source):
    broken = source["tmp"] / "broken"
    shutil.copytree(source["checkpoint"], broken)
    shard = sorted(broken.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    out = source["tmp"] / "good"
    out.mkdir()
    (out / "keep.txt").write_text("previous good output")
    write_marker(out, "reshard", [source["checkpoint"]])  # an earlier reshard's output
    proc = run_cli("reshard", "--input", broken, "--output", out, "--dp", "1", "--overwrite",
                   check=False)
    assert proc.returncode == 1
    assert "resharding worker process(es) at tp=1 pp=1 dp=1 failed" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".good.")]

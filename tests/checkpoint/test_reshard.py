"""Resuming at another TP/PP/DP layout, and ``flagscale reshard``, on real gloo process groups.

One tiny run at dp=2 saves iteration 5 (``dp_reshardable``, training's default) and continues to
8; its losses at 6-8 are the reference a resume at any other layout must reproduce. Adam moments
and fp32 master weights are compared tensor for tensor, read offline from the resharded
checkpoints and from the source's state saved ``fully_reshardable`` at its own layout by the
engine itself. A second run at tp=2 checks the offline converter's TP reassembly the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flagscale.checkpoint import CheckpointMeta, read_run_state
from flagscale.checkpoint.meta import check_resumable, optimizer_sharding
from flagscale.checkpoint.output import MARKER, write_marker
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.config import ParallelDims
from flagscale.errors import CheckpointError, ConfigError, FlagScaleError, OutputError
from flagscale.train.reshard import converted_dir, reshard, resave
from tests.dist import run_cli, run_distributed, run_losses

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


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """A dp=2 run: its iteration-5 checkpoint and its losses at 6-8 (the continued reference)."""
    tmp = tmp_path_factory.mktemp("reshard")
    config = _config(tmp, tiny_corpus, tiny_tokenizer)
    run_cli("train", config)
    return {"config": config, "tmp": tmp,
            "checkpoint": tmp / "source" / "checkpoints" / f"iter_{SAVED:07d}",
            "losses": {i: loss for i, loss in run_losses(tmp / "source").items() if i > SAVED}}


@pytest.fixture(scope="module")
def reference(source):
    """The source's state saved fully_reshardable at its own layout: parameter-shaped optimizer
    tensors to compare resharded checkpoints with."""
    run_distributed(resave, 2, source["checkpoint"], source["tmp"] / "reference",
                    ParallelDims(tp=1, pp=1, dp=2), "fully_reshardable")
    return source["tmp"] / "reference" / f"iter_{SAVED:07d}"


def _resume(source: dict, name: str, checkpoint: Path, *layout: str,
            stdout: list | None = None) -> dict[int, float]:
    run_dir = source["tmp"] / name
    proc = run_cli("train", source["config"], *layout, f"checkpoint.load={checkpoint}",
                   "checkpoint.save_interval=0", f"run.dir={run_dir}")
    if stdout is not None:
        stdout.append(proc.stdout)
    return run_losses(run_dir)


def _assert_samerun_losses(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys() == set(range(SAVED + 1, LAST + 1)), what
    for it, loss in expected.items():
        assert actual[it] == pytest.approx(loss, rel=1e-5), f"{what}: iteration {it}"


@pytest.fixture(scope="module")
def tp2_source(source):
    """The same run at tp=2: its iteration-5 checkpoint, its losses at 6-8, and its state saved
    fully_reshardable by the engine at tp=2."""
    run_dir = source["tmp"] / "tp2_source"
    run_cli("train", source["config"], "parallel.tp=2", "parallel.dp=1", f"run.dir={run_dir}")
    checkpoint = run_dir / "checkpoints" / f"iter_{SAVED:07d}"
    run_distributed(resave, 2, checkpoint, source["tmp"] / "tp2_reference",
                    ParallelDims(tp=2, pp=1, dp=1), "fully_reshardable")
    return {"checkpoint": checkpoint,
            "losses": {i: loss for i, loss in run_losses(run_dir).items() if i > SAVED},
            "reference": source["tmp"] / "tp2_reference" / f"iter_{SAVED:07d}"}


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


def _prepare_again(checkpoint: Path, config: Path, run_dir: Path) -> tuple[Path, list[str]]:
    """One rank of a tp=2 world: what a second resume from ``checkpoint`` would load."""
    from flagscale.config import load_config, validate
    from flagscale.platform import setup_platform
    from flagscale.train.reshard import prepare_resume
    from flagscale.train.setup import init_process_group

    cfg = load_config(config, ["parallel.tp=2", "parallel.dp=1"])
    platform = setup_platform(cfg.platform)
    init_process_group(platform)
    lines: list[str] = []
    path = prepare_resume(checkpoint, cfg, validate(cfg, 2, check_paths=False), run_dir,
                          platform, lines.append)
    return path, lines


def test_training_saves_each_ranks_own_optimizer_shard(source):
    assert optimizer_sharding(read_run_state(source["checkpoint"])) == "dp_reshardable"


def test_resume_at_tp2_converts_once_and_matches_continuing_at_dp2(source):
    out: list = []
    resumed = _resume(source, "tp2", source["checkpoint"], "parallel.tp=2", "parallel.dp=1",
                      stdout=out)
    _assert_samerun_losses(resumed, source["losses"], "resumed at tp=2")
    converted = converted_dir(source["checkpoint"], source["tmp"] / "tp2",
                              ParallelDims(tp=2, pp=1, dp=1))
    assert converted.name == "iter_0000005.tp2pp1"
    assert f"converting it for tp=2 pp=1 dp=1 into {converted}" in out[0]
    assert optimizer_sharding(read_run_state(converted)) == "fully_reshardable"
    # The next resume from the same checkpoint loads the conversion without redoing it.
    results = run_distributed(_prepare_again, 2, source["checkpoint"], source["config"],
                              source["tmp"] / "tp2")
    assert [path for path, _ in results] == [converted, converted]
    assert "made earlier" in results[0][1][0]


def test_resume_at_another_dp_loads_directly(source):
    out: list = []
    resumed = _resume(source, "dp1", source["checkpoint"], "--nproc", "1", "parallel.dp=1",
                      stdout=out)
    _assert_samerun_losses(resumed, source["losses"], "resumed at dp=1")
    assert "converting" not in out[0]
    assert not (source["tmp"] / "dp1" / "checkpoints" / "resharded").exists()


def test_resume_with_other_optimizer_buckets_converts_and_matches_continuing(source):
    # Bucket-space optimizer state reloads only into the buckets that wrote it: a resume with
    # another bucket size (or parameter dtype, or after a flagscale upgrade) is converted first
    # instead of failing inside megatron-core's load.
    out: list = []
    resumed = _resume(source, "buckets", source["checkpoint"],
                      "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=200000",
                      stdout=out)
    _assert_samerun_losses(resumed, source["losses"], "resumed with other buckets")
    converted = converted_dir(source["checkpoint"], source["tmp"] / "buckets",
                              ParallelDims(tp=1, pp=1, dp=2))
    assert "saved in other buckets than this run's" in out[0] and str(converted) in out[0]
    assert optimizer_sharding(read_run_state(converted)) == "fully_reshardable"


def test_index_maps_place_every_byte_of_the_flat_buffers(source, reference):
    """An offline tool cuts each rank's bucket tensors into parameters with the saved maps and
    finds the same master weights and moments as the parameter-shaped save."""
    maps = CheckpointMeta.from_common(read_run_state(source["checkpoint"])).param_index_maps
    assert [(m["tp_rank"], m["pp_rank"]) for m in maps] == [(0, 0)]
    flat, shaped = CheckpointReader(source["checkpoint"]), CheckpointReader(reference)
    names = set()
    for bucket in maps[0]["buckets"]:
        ranges = sorted((p["start"], p["end"]) for p in bucket["params"])
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])) and \
            ranges[-1][1] <= bucket["numel"]
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            buffer = flat.read_full(f"{bucket['key']}.{kind}")
            assert buffer.numel() == bucket["numel"]
            for p in bucket["params"]:
                expected = shaped.read_full(f"optimizer.state.{kind}.{p['key']}")
                expected = expected if p["layer"] is None else expected[p["layer"]]
                assert list(expected.shape) == p["shape"] and p["tp_axis"] in (None, 0, 1)
                assert torch.equal(buffer[p["start"]:p["end"]].view(p["shape"]), expected), \
                    (p["name"], kind)
                names.add(p["name"])
    assert len(names) == 4 * 6 + 3  # 6 per layer, embedding, final norm, output layer


def test_reshard_to_pp2_keeps_optimizer_state_and_resumes_exactly(source, reference):
    out = source["tmp"] / "pp2"
    proc = run_cli("reshard", "--input", reference, "--output", out, "--pp", "2")
    assert ("tp=1 pp=1 dp=2 (fully_reshardable) -> tp=1 pp=2 dp=1 (fully_reshardable); 9 model "
            "tensors, 27 optimizer state tensors") in proc.stdout
    _assert_same_state(out, reference)
    assert read_run_state(out)["flagscale"]["layout"] == {"tp": 1, "pp": 2, "cp": 1, "dp": 1,
                                                          "vpp": None}
    assert CheckpointMeta.from_common(read_run_state(out)).dims == ParallelDims(tp=1, pp=2, dp=1)
    assert yaml.safe_load((out / "flagscale_config.yaml").read_text())["parallel"]["pp"] == 2
    resumed = _resume(source, "pp2_run", out, "parallel.pp=2", "parallel.dp=1")
    _assert_samerun_losses(resumed, source["losses"], "resharded to pp=2")


def test_dp_reshardable_checkpoint_reshards_to_tp2(source, reference):
    tmp = source["tmp"]
    # Training's own save: megatron-core's bucket-space format (Megatron-LM's default).
    dp_checkpoint = source["checkpoint"]
    common = read_run_state(dp_checkpoint)
    with pytest.raises(CheckpointError, match="flagscale reshard --input"):
        check_resumable(dp_checkpoint, common, ParallelDims(tp=2, pp=1, dp=1))
    check_resumable(dp_checkpoint, common, ParallelDims(tp=1, pp=1, dp=2))

    out = tmp / "dp_to_tp2"
    proc = run_cli("reshard", "--input", dp_checkpoint, "--output", out, "--tp", "2")
    assert "tp=1 pp=1 dp=2 (dp_reshardable) -> tp=2 pp=1 dp=1 (fully_reshardable)" in proc.stdout
    _assert_same_state(out, reference)
    resumed = _resume(source, "dp_to_tp2_run", out, "parallel.tp=2", "parallel.dp=1")
    _assert_samerun_losses(resumed, source["losses"], "dp_reshardable resharded to tp=2")


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
    # The truncated shard is found from the checkpoint's metadata before any worker starts.
    assert "is incomplete" in proc.stderr and str(shard) in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".good.")]


def test_offline_reshard_of_tp2_state_equals_the_engines_own_save(source, tp2_source):
    """TP shards (fc1's gate/up halves, row- and column-split weights) are reassembled from the
    flat buffers bit for bit, in this one process, without megatron-core's parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    out = source["tmp"] / "tp2_offline"
    result = reshard(tp2_source["checkpoint"], out, progress=False, log=lambda line: None)
    assert result.plan.offline and (result.model_tensors, result.optimizer_tensors) == (9, 27)
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    _assert_same_state(out, tp2_source["reference"])
    assert optimizer_sharding(read_run_state(out)) == "fully_reshardable"
    assert CheckpointMeta.from_common(read_run_state(out)).data_fingerprint == \
        CheckpointMeta.from_common(read_run_state(tp2_source["checkpoint"])).data_fingerprint


def test_resume_of_a_tp2_save_at_pp2_with_vpp_follows_the_run(source, tp2_source):
    out: list = []
    resumed = _resume(source, "tp2_to_vpp", tp2_source["checkpoint"], "parallel.pp=2",
                      "parallel.vpp=2", "parallel.dp=1", stdout=out)
    assert "offline on rank 0" in out[0]
    _assert_samerun_losses(resumed, tp2_source["losses"], "tp=2 save resumed at pp=2 vpp=2")


def test_missing_rank_shard_is_named_before_any_output(source):
    broken = source["tmp"] / "missing_shard"
    shutil.copytree(source["checkpoint"], broken)
    shard = sorted(broken.glob("*.distcp"))[-1]
    shard.unlink()
    out = source["tmp"] / "from_missing"
    with pytest.raises(CheckpointError, match=f"shard {shard} is missing"):
        reshard(broken, out, tp=2, progress=False)
    assert not out.exists() and not [p for p in out.parent.iterdir()
                                     if p.name.startswith(".from_missing")]


def test_bucket_state_without_index_maps_goes_through_the_engine(source, reference):
    """Another tool's dp_reshardable save records no index maps: only the engine, building the
    same buckets at the saved layout, can cut it into parameters."""
    no_maps = source["tmp"] / "no_maps"
    shutil.copytree(source["checkpoint"], no_maps)
    common = torch.load(no_maps / "common.pt", weights_only=False)
    del common["flagscale"]["param_index_maps"]
    torch.save(common, no_maps / "common.pt")
    out = source["tmp"] / "no_maps_out"
    proc = run_cli("reshard", "--input", no_maps, "--output", out, "--dp", "1")
    assert "without parameter index maps" in proc.stdout
    _assert_same_state(out, reference)

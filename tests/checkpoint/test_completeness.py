"""A checkpoint directory counts as complete only when every file its metadata names is there and
long enough, and ``checkpoint.keep_last`` never leaves a directory that looks complete but is not.
"""

from __future__ import annotations

import shutil

import pytest
from torch.distributed.checkpoint import FileSystemReader

from flagscale.checkpoint import (checkpoint_problem, complete_checkpoints, latest_checkpoint,
                                  retire_checkpoints)


def _shards(path):
    return sorted({info.relative_path
                   for info in FileSystemReader(str(path)).read_metadata().storage_data.values()})


def test_a_saved_checkpoint_is_complete_by_its_metadata(saved_run):
    checkpoints = saved_run / "checkpoints"
    newest = checkpoints / "iter_0000002"
    assert checkpoint_problem(newest) is None
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["iter_0000001", "iter_0000002"]
    # Both data-parallel ranks wrote their own storage files (__RANK_N.distcp); all are checked.
    assert {s.split("_")[2] for s in _shards(newest)} == {"0", "1"}
    assert all((newest / s).is_file() for s in _shards(newest))


def test_metadata_without_its_shards_is_not_a_checkpoint(run_copy):
    # What an interrupted `rm -r` of an old checkpoint used to leave: metadata.json, no shards.
    checkpoints = run_copy / "checkpoints"
    newest = checkpoints / "iter_0000002"
    for shard in newest.glob("*.distcp"):
        shard.unlink()
    assert "is missing" in checkpoint_problem(newest)
    assert str(newest / "__0_0.distcp") in checkpoint_problem(newest)
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["iter_0000001"]
    with pytest.warns(UserWarning, match=r"latest names iter_0000002, but shard .*__0_0\.distcp "
                                         r"is missing; using iter_0000001"):
        assert latest_checkpoint(checkpoints) == checkpoints / "iter_0000001"


def test_a_shard_shorter_than_the_data_it_holds_is_named(run_copy):
    newest = run_copy / "checkpoints" / "iter_0000002"
    shard = newest / _shards(newest)[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1)
    assert checkpoint_problem(newest) == (f"shard {shard} is truncated ({size - 1} bytes, its "
                                          f"data reaches byte {size})")


def test_flagscale_files_and_torch_metadata_are_required(run_copy):
    newest = run_copy / "checkpoints" / "iter_0000002"
    (newest / "flagscale_config.yaml").unlink()
    assert checkpoint_problem(newest) == f"{newest / 'flagscale_config.yaml'} is missing"
    # A checkpoint given explicitly may be Megatron-LM's, which has no flagscale files.
    assert checkpoint_problem(newest, flagscale_files=False) is None
    (newest / ".metadata").write_bytes(b"\x80\x04not a pickle")
    assert ".metadata is missing or unreadable" in checkpoint_problem(newest,
                                                                      flagscale_files=False)


def test_keep_last_renames_old_checkpoints_before_deleting_them(run_copy):
    checkpoints = run_copy / "checkpoints"
    leftover = checkpoints / "iter_0000000.deleting"  # a deletion cut short by a crash
    leftover.mkdir()
    (leftover / "metadata.json").write_text("{}")
    retired = retire_checkpoints(checkpoints, keep_last=1)
    assert sorted(p.name for p in retired) == ["iter_0000000.deleting", "iter_0000001.deleting"]
    # Nothing named like a checkpoint is left but the one kept, and it is untouched.
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("iter_")
            and not p.name.endswith(".deleting")] == ["iter_0000002"]
    assert latest_checkpoint(checkpoints) == checkpoints / "iter_0000002"
    for path in retired:
        shutil.rmtree(path)
    assert retire_checkpoints(checkpoints, keep_last=1) == []

"""A dataset rebuilt under the same prefix is detected: a resume or a trace on it is refused
naming the prefix and the file that changed, and the index cache is keyed by the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flagscale.checkpoint import CheckpointMeta, read_run_state
from flagscale.config import load_config
from flagscale.data import load_tokenizer, preprocess
from flagscale.data.fingerprint import (check_data_unchanged, data_cache_dir, dataset_fingerprint,
                                        read_run_fingerprints)
from flagscale.errors import DataError
from flagscale.trace.offline import trace_iterations
from tests.checkpoint.conftest import run_config
from tests.dist import run_cli


def _copy_dataset(prefix: str, to: Path) -> str:
    to.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".prov.json", ".prov.npy"):
        shutil.copy(prefix + suffix, str(to) + suffix)
    return str(to)


def _rebuild(prefix: str, tmp_path: Path, tokenizer: str) -> Path:
    """Rebuild ``prefix`` from another (small) source file, as a user re-running preprocess."""
    source = tmp_path / "edited.jsonl"
    source.write_text("".join(json.dumps({"text": f"edited document {i}"}) + "\n"
                              for i in range(50)))
    preprocess([source], prefix, load_tokenizer(tokenizer), workers=1, progress=False)
    return source


def test_a_rebuilt_dataset_changes_its_fingerprint_and_cache_key(tmp_path, tiny_corpus,
                                                                tiny_tokenizer):
    prefix = _copy_dataset(tiny_corpus, tmp_path / "data" / "corpus")
    before = {prefix: dataset_fingerprint(prefix)}
    assert before[prefix]["bin_bytes"] == Path(prefix + ".bin").stat().st_size
    assert len(before[prefix]["sources"]) == 1  # the bundled corpus, with its build-time sha256
    check_data_unchanged(before, {prefix: dataset_fingerprint(prefix)}, "same", "fix")
    source = _rebuild(prefix, tmp_path, tiny_tokenizer)
    after = {prefix: dataset_fingerprint(prefix)}
    with pytest.raises(DataError) as raised:
        check_data_unchanged(before, after, "Resuming from X", "Restore it.")
    message = str(raised.value)
    assert message.startswith("Resuming from X: its data changed since the run read it: ")
    assert f"{prefix}.idx: sha256 {before[prefix]['idx_sha256'][:12]} -> " in message
    assert "(the dataset was rebuilt)" in message and f"{prefix}.bin: " in message
    assert f"{prefix}: source {source} added" in message and message.endswith("Restore it.")
    assert data_cache_dir(tmp_path, before) != data_cache_dir(tmp_path, after)
    # A run recorded before fingerprints existed is not checked.
    check_data_unchanged({}, after, "old run", "fix")


def test_resume_and_trace_on_a_rebuilt_dataset_are_refused(tmp_path, tiny_corpus,
                                                           tiny_tokenizer):
    prefix = _copy_dataset(tiny_corpus, tmp_path / "data" / "corpus")
    run_dir = tmp_path / "run"
    config = run_config(tmp_path / "config.yaml", prefix, tiny_tokenizer, run_dir,
                        parallel={"dp": 1}, train={"iterations": 3, "stop_iteration": 2},
                        checkpoint={"save_interval": 2})
    run_cli("train", config, "--nproc", "1")
    recorded = read_run_fingerprints(run_dir)
    assert recorded == {prefix: dataset_fingerprint(prefix)}
    saved = read_run_state(run_dir / "checkpoints" / "iter_0000002")
    assert CheckpointMeta.from_common(saved).data_fingerprint == recorded
    assert [p.name for p in (run_dir / "data_cache").iterdir()] == [
        data_cache_dir(run_dir, recorded).name]
    cfg = load_config(config)
    traced = list(trace_iterations(cfg, 1, run_dir=run_dir))
    assert traced and all(r["dataset"] == prefix for r in traced)

    _rebuild(prefix, tmp_path, tiny_tokenizer)
    proc = run_cli("train", config, "--nproc", "1", "train.stop_iteration=null", check=False)
    assert proc.returncode != 0
    assert (f"Resuming from {run_dir / 'checkpoints' / 'iter_0000002'}: its data changed since "
            f"the run read it: {prefix}.idx: sha256") in proc.stderr
    assert "run.dir=NEW_DIR checkpoint.load=" in proc.stderr
    with pytest.raises(DataError, match=rf"Tracing {run_dir}: its data changed since the run "
                                        rf"read it: {prefix}\.idx: sha256"):
        list(trace_iterations(cfg, 1, run_dir=run_dir))

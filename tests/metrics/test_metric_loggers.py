"""The writers: metrics.jsonl and a real offline wandb run hold what the hooks logged."""

import json
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flagscale.config import load_config, validate
from flagscale.metrics import build_metric_hooks
from flagscale.train.hooks import StepInfo

CONTRACT_KEYS = {"iteration", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_sec_per_gpu",
                 "tflops_per_gpu", "mfu", "consumed_samples"}


def _train_like_the_loop(run_dir: Path, overrides=(), iterations=6, log_every=2) -> list[dict]:
    """Call every metric hook in the order the loop does, with records the loop would pre-fill."""
    cfg = load_config(None, ["model.preset=tiny", f"run.dir={run_dir}", "metrics.peak_tflops=100",
                             f"train.iterations={iterations}", *overrides])
    layout = validate(cfg, 2, check_paths=False)
    hooks = build_metric_hooks(cfg, layout, run_dir)
    state = SimpleNamespace(cfg=cfg, layout=layout, is_writer=True, run_dir=run_dir,
                            start_iteration=0)
    for hook in hooks:
        hook.on_train_start(state)
    records = []
    for it in range(1, iterations + 1):
        step = StepInfo(iteration=it, step_time_s=2.0 if it == 1 else 0.5,
                        consumed_samples=8 * it, lr=1e-3)
        for hook in hooks:
            hook.on_step_end(state, step)
        if it % log_every == 0:
            record = {"iteration": it, "loss": 5.0 - 0.1 * it, "lr": 1e-3, "grad_norm": 0.75,
                      "consumed_samples": 8 * it}
            for hook in hooks:
                hook.on_log(state, record)
            records.append(record)
    for hook in hooks:
        hook.on_train_end(state)
    return records


def test_jsonl_holds_contract_keys_and_console_prints(tmp_path, capsys):
    records = _train_like_the_loop(tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [r["iteration"] for r in lines] == [2, 4, 6]
    assert lines == records
    for line in lines:
        assert CONTRACT_KEYS <= line.keys()
        assert line["step_time_s"] == 0.5 and line["mfu"] > 0
    out = capsys.readouterr().out
    assert "iter      6/6" in out and "tok/s/gpu 1,024" in out and "MFU" in out


def _wandb_records(path: Path) -> list:
    """Decode a ``.wandb`` transaction log: a 7-byte ``:W&B`` header, then LevelDB-log chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each payload a
    serialized ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "tiny_run"
    records = _train_like_the_loop(run_dir, ["metrics.wandb=true",
                                             "metrics.wandb_project=flagscale-test"])
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    # wandb-core closes the log just after finish() returns to the training process.
    deadline = time.monotonic() + 30
    while True:
        decoded = _wandb_records(run_files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in decoded) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run = next(r.run for r in decoded if r.WhichOneof("record_type") == "run")
    assert run.project == "flagscale-test" and run.display_name == "tiny_run"
    assert run.run_id == (run_dir / "wandb" / "run_id").read_text().strip()
    config_keys = {item.key for item in run.config.update}
    assert {"model", "parallel", "train", "metrics"} <= config_keys
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in decoded if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [2, 4, 6]
    for logged, record in zip(history, records):
        for key in ("loss", "step_time_s", "tokens_per_sec_per_gpu", "tflops_per_gpu", "mfu"):
            assert logged[key] == pytest.approx(record[key])


def test_tensorboard_event_files_hold_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _train_like_the_loop(tmp_path / "run", ["metrics.tensorboard=true"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    mfu = events.Scalars("mfu")
    assert [e.step for e in mfu] == [2, 4, 6]
    assert [e.value for e in mfu] == pytest.approx([r["mfu"] for r in records], rel=1e-6)

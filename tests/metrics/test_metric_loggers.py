"""The loggers: metrics.jsonl, the console, a real offline wandb run and TensorBoard event files
hold what was logged."""

import json
import struct
import time
from pathlib import Path

import pytest

from flagscale.config import load_config, validate
from flagscale.metrics import build_loggers, build_throughput_meter

CONTRACT_KEYS = {"iteration", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_sec_per_gpu",
                 "tflops_per_gpu", "mfu", "consumed_samples"}


def _train_like_the_loop(run_dir: Path, overrides=(), iterations=6, log_every=2,
                         failed=False) -> list[dict]:
    """Drive a run's meter and loggers as the training loop's callbacks do, with records the loop
    would pre-fill."""
    cfg = load_config(None, ["model.preset=tiny", f"run.dir={run_dir}", "metrics.peak_tflops=100",
                             f"train.iterations={iterations}", *overrides])
    layout = validate(cfg, 2, check_paths=False)
    meter, loggers = build_throughput_meter(cfg, layout), build_loggers(cfg, run_dir)
    meter.start(0)
    for logger in loggers:
        logger.open(0)
    records = []
    for it in range(1, iterations + 1):
        meter.add_step(it, 2.0 if it == 1 else 0.5)
        if it % log_every == 0:
            record = {"iteration": it, "loss": 5.0 - 0.1 * it, "lr": 1e-3, "grad_norm": 0.75,
                      "consumed_samples": 8 * it, **meter.end_interval()}
            for logger in loggers:
                logger.write(record)
            records.append(record)
    for logger in loggers:
        logger.close(failed=failed)
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


@pytest.mark.parametrize("failed", [False, True], ids=["finished", "crashed"])
def test_wandb_offline_run_holds_logged_metrics(tmp_path, monkeypatch, failed):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "tiny_run"
    records = _train_like_the_loop(run_dir, ["metrics.wandb=true",
                                             "metrics.wandb_project=flagscale-test"],
                                   failed=failed)
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
    # A crashed run is finished too, marked failed (exit code 1) instead of left running.
    exit_record = next(r.exit for r in decoded if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == (1 if failed else 0)
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

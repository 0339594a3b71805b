"""Per-interval throughput, MFU and device peaks, fed to the meter as the loop's throughput
callback does."""

import importlib.util

import pytest

from flagscale.config import load_config, validate
from flagscale.errors import ConfigError
from flagscale.metrics import (build_loggers, build_throughput_meter, canonical_device,
                               flops_for_config, peak_tflops, resolve_peak)


def _setup(overrides=(), world_size=2):
    cfg = load_config(None, ["model.preset=tiny", "train.global_batch_size=8",
                             "train.seq_length=128", *overrides])
    return cfg, validate(cfg, world_size, check_paths=False)


def _run(meter, step_times: dict[int, float], log_every: int, start_iteration=0) -> list[dict]:
    """Drive ``meter`` like the throughput callback: each step's time, a record every interval."""
    meter.start(start_iteration)
    records = []
    for iteration, seconds in step_times.items():
        meter.add_step(iteration, seconds)
        if iteration % log_every == 0:
            records.append({"iteration": iteration, "loss": 5.0, **meter.end_interval()})
    return records


def test_record_identities_hold():
    cfg, layout = _setup(["metrics.peak_tflops=50"])
    meter = build_throughput_meter(cfg, layout)
    records = _run(meter, {i: 0.25 + 0.01 * i for i in range(1, 9)}, log_every=4)
    flops = flops_for_config(cfg).flops_per_token
    for r in records:
        assert r["tokens_per_sec_per_gpu"] * r["step_time_s"] * layout.world_size == \
            pytest.approx(cfg.train.global_batch_size * cfg.train.seq_length)
        assert r["tflops_per_gpu"] / r["tokens_per_sec_per_gpu"] == pytest.approx(flops / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 50)
        assert r["hfu"] == r["mfu"]  # no recomputation configured
        assert r["memory_gib"] > 0


def test_first_step_after_start_is_excluded_from_averages():
    cfg, layout = _setup(["metrics.peak_tflops=50"])
    meter = build_throughput_meter(cfg, layout)
    # Step 1 (allocator warm-up, first data load) is 10x slower and must not drag the mean.
    records = _run(meter, {1: 3.0, 2: 0.3, 3: 0.5, 4: 0.4}, log_every=2)
    assert records[0]["step_time_s"] == pytest.approx(0.3) and records[0]["timed_steps"] == 1
    assert records[1]["step_time_s"] == pytest.approx(0.45) and records[1]["timed_steps"] == 2


def test_first_step_after_resume_is_excluded_and_lone_warmup_interval_reports_null():
    cfg, layout = _setup(["metrics.peak_tflops=50"])
    meter = build_throughput_meter(cfg, layout)
    records = _run(meter, {11: 4.0, 12: 0.2, 13: 0.4}, log_every=1, start_iteration=10)
    first = records[0]
    assert first["timed_steps"] == 0
    assert first["step_time_s"] is None and first["tokens_per_sec_per_gpu"] is None
    assert first["tflops_per_gpu"] is None and first["mfu"] is None
    assert [r["step_time_s"] for r in records[1:]] == [0.2, 0.4]


def test_unknown_device_reports_no_mfu_and_warns_once():
    cfg, layout = _setup()  # CPU: no device, no peak
    meter = build_throughput_meter(cfg, layout)
    with pytest.warns(UserWarning, match="MFU will not be reported: no GPU detected") as caught:
        records = _run(meter, {1: 1.0, 2: 1.0, 3: 1.0}, log_every=1)
    assert len([w for w in caught if "MFU" in str(w.message)]) == 1
    assert all(r["mfu"] is None for r in records)
    assert records[-1]["tflops_per_gpu"] is not None
    # Non-writer ranks have no meter: tests/train/test_callbacks.py.


def test_configured_device_uses_table_and_dtype():
    cfg, layout = _setup(["metrics.device=h100-sxm", "model.params_dtype=bf16"])
    meter = build_throughput_meter(cfg, layout)
    assert meter.peak_tflops == 989.0
    # fp32 training has no tabulated peak: no silent fallback to the bf16 figure.
    cfg, layout = _setup(["metrics.device=h100-sxm", "model.params_dtype=fp32"])
    assert build_throughput_meter(cfg, layout).peak_tflops is None
    cfg, layout = _setup(["metrics.device=rtx-4090"])
    with pytest.raises(ConfigError, match="metrics.device 'rtx-4090' is not in the peak"):
        build_throughput_meter(cfg, layout)
    cfg, layout = _setup(["metrics.device=rtx-4090", "metrics.peak_tflops=165"])
    assert build_throughput_meter(cfg, layout).peak_tflops == 165.0


@pytest.mark.parametrize("name, key, bf16", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm", 989.0), ("NVIDIA H100 NVL", "h100-nvl", 835.0),
    ("NVIDIA H100 PCIe", "h100-pcie", 756.0), ("NVIDIA H200", "h200", 989.0),
    ("NVIDIA H800", "h800", 989.0), ("NVIDIA A100-SXM4-80GB", "a100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "a100", 312.0), ("NVIDIA A800-SXM4-80GB", "a800", 312.0),
    ("NVIDIA RTX A1000", None, None), ("NVIDIA H800 PCIe", None, None), ("cpu", None, None)])
def test_device_names_map_to_peaks(name, key, bf16):
    assert canonical_device(name) == key
    assert peak_tflops(name, "bf16") == bf16


def test_fp8_peak_and_missing_precision():
    assert peak_tflops("h100-sxm", "fp8") == 1979.0
    assert peak_tflops("a100", "fp8") is None
    device, peak, why = resolve_peak("a100", "fp8")
    assert peak is None and "no fp8 peak for a100" in why


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed here")
def test_tensorboard_without_package_is_a_config_error(tmp_path):
    cfg, _ = _setup(["metrics.tensorboard=true"])
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        build_loggers(cfg, tmp_path)

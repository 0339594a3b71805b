"""`flagscale flops` and `flagscale plot` as a user runs them."""

import json

import pytest
import yaml
from matplotlib.image import imread

from flagscale.cli.main import main
from flagscale.metrics import flops_per_token, preset_model


def _flops(capsys, *argv) -> str:
    assert main(["flops", *argv]) == 0
    return capsys.readouterr().out


def test_json_output_for_a_preset(capsys):
    report = json.loads(_flops(capsys, "--model", "llama3_8b", "--json"))
    assert report["convention"] == "megatron" and report["seq_length"] == 8192
    assert report["params"] == 8_030_261_248
    assert round(report["flops_per_token"] / 1e9, 2) == 51.47
    assert set(report["breakdown"]) == {"qkv", "attention", "out_proj", "mlp", "logits"}
    assert sum(report["breakdown"].values()) == pytest.approx(report["flops_per_token"])


def test_long_context_preset_defaults_to_its_pretraining_context(capsys):
    report = json.loads(_flops(capsys, "--model", "llama3_1_405b", "--json"))
    assert report["seq_length"] == 8192
    assert round(report["flops_per_token"] / 1e9, 2) == 2523.96


def test_palm_convention_is_labelled(capsys):
    out = _flops(capsys, "--model", "llama3_8b", "--convention", "palm")
    assert "palm convention (full attention" in out
    assert "total              57.9144" in out


def test_config_file_and_measured_throughput(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"parallel": {"tp": 8},
                                      "train": {"seq_length": 8192, "global_batch_size": 512},
                                      "model": {"preset": "llama3_70b", "params_dtype": "bf16"},
                                      "metrics": {"device": "h100-sxm"}}))
    report = json.loads(_flops(capsys, str(config), "--json", "--gpus", "64",
                               "--step-time", "60"))
    model = preset_model("llama3_70b")
    assert report["flops_per_token"] == flops_per_token(model, 8192, tp=8).flops_per_token
    tp = report["throughput"]
    assert tp["tokens_per_sec_per_gpu"] == pytest.approx(512 * 8192 / (60 * 64))
    assert tp["tflops_per_gpu"] == pytest.approx(
        tp["tokens_per_sec_per_gpu"] * report["flops_per_token"] / 1e12)
    assert tp["mfu"] == pytest.approx(tp["tflops_per_gpu"] / 989)
    assert 0.45 < tp["mfu"] < 0.55  # in the range Megatron-Core publishes for 70B on H100
    text = _flops(capsys, str(config), "--gpus", "64", "--step-time", "60")
    assert "tokens/s/GPU  1,092.3" in text and "MFU           49.6% of 989 TFLOP/s" in text


def test_throughput_without_known_device_has_no_mfu(capsys):
    out = _flops(capsys, "--model", "tiny", "--gpus", "2", "--step-time", "0.5",
                 "--global-batch", "8", "--seq-len", "128")
    assert "MFU           n/a (no GPU detected" in out


def test_user_errors_exit_nonzero_with_a_message(capsys):
    assert main(["flops", "--model", "llama3_8b", "--gpus", "8", "--step-time", "1"]) == 1
    assert "--global-batch" in capsys.readouterr().err
    assert main(["flops", "--model", "llama3_8b", "--gpus", "8", "--step-time", "1",
                 "--global-batch", "8", "--device", "tpu-v5"]) == 1
    assert "Device 'tpu-v5' is not in the peak-throughput table" in capsys.readouterr().err
    assert main(["flops"]) == 1
    assert "exactly one of CONFIG" in capsys.readouterr().err


def test_plot_writes_readable_pngs_from_metrics_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"iteration": i, "loss": 9.0 - 0.1 * i, "step_time_s": None if i == 1 else 0.5,
                "tokens_per_sec_per_gpu": None if i == 1 else 1024.0,
                "tflops_per_gpu": None if i == 1 else 0.4, "mfu": None} for i in range(1, 21)]
    # A resumed run appended iterations 19-20 again; the later records win.
    records += [{"iteration": 19, "loss": 1.0, "tokens_per_sec_per_gpu": 900.0, "mfu": None},
                {"iteration": 20, "loss": 1.0, "tokens_per_sec_per_gpu": 900.0, "mfu": None}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(run)]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    # No device peak in this run: the third chart shows TFLOP/s/GPU instead of MFU.
    assert names == ["loss.png", "tflops_per_gpu.png", "tokens_per_sec_per_gpu.png"]
    for path in written:
        image = imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image.std() > 0.01  # something was drawn
    assert not list((run / "plots").glob("*.tmp"))


def test_plot_of_a_run_without_metrics_is_a_data_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    # A bad line before the last is not a write cut short by a crash: an error naming it.
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 2.0}\nnot json\n'
                                            '{"iteration": 2, "loss": 1.9}\n')
    assert main(["plot", str(tmp_path)]) == 1
    assert "line 2" in capsys.readouterr().err

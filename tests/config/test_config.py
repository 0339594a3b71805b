"""Config loading, presets, derived layout and the errors a user sees before any work starts."""

from __future__ import annotations

import pytest
import yaml

from flagscale.cli.main import main
from flagscale.config import (MODEL_PRESETS, all_keys, key_docs, load_config, padded_vocab_size,
                              validate)
from flagscale.errors import ConfigError


def _write(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_key_is_documented():
    assert set(key_docs()) == set(all_keys())
    assert all(doc for doc in key_docs().values())


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_give_consistent_architectures(preset):
    cfg = load_config(overrides=[f"model.preset={preset}"])
    layout = validate(cfg, world_size=1, check_paths=False)
    assert layout.kv_channels * cfg.model.num_attention_heads == cfg.model.hidden_size
    assert layout.padded_vocab_size % 128 == 0 and layout.padded_vocab_size >= cfg.model.vocab_size


def test_llama3_8b_layout_is_derived_in_one_place():
    cfg = load_config(overrides=["model.preset=llama3_8b", "parallel.tp=8", "parallel.pp=2",
                                 "train.micro_batch_size=1", "train.global_batch_size=64"])
    layout = validate(cfg, world_size=64, check_paths=False)
    assert (layout.dp, layout.num_microbatches) == (4, 16)
    # 128256 padded to a multiple of 128 * tp(8) = 1024.
    assert layout.padded_vocab_size == 129024 == padded_vocab_size(128256, 128, 8)
    assert cfg.model.rope_theta == 500000.0 and cfg.model.num_query_groups == 8


def test_explicit_fields_override_the_preset_and_yaml_floats_are_read(tmp_path):
    cfg = load_config(_write(tmp_path, {"model": {"preset": "tiny", "num_layers": 8},
                                        "train": {"lr": "3e-4"}}))
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 128
    assert cfg.train.lr == pytest.approx(3e-4)


def test_misspelt_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'parallel\.tpp'.*Did you mean 'parallel\.tp'"):
        load_config(_write(tmp_path, {"parallel": {"tpp": 2}}))
    with pytest.raises(ConfigError, match=r"'train\.iteration'.*command-line.*'train\.iterations'"):
        load_config(overrides=["train.iteration=5"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'parallel\.tp'.*must be int.*'two'"):
        load_config(overrides=["parallel.tp=two"])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 3, r"num_attention_heads \(4\) % parallel\.tp \(3\) = 1"),
    (["parallel.pp=3"], 3, r"num_layers \(4\) % parallel\.pp \(3\) = 1"),
    (["parallel.tp=2"], 3, r"tp\(2\) \* pp\(1\) \* cp\(1\) \* dp\(\?\) != world size \(3\)"),
    (["parallel.pp=2", "parallel.vpp=4"], 2, r"num_layers \(4\) % parallel\.pp \(2\) \* "
                                              r"parallel\.vpp \(4\)"),
    (["parallel.sequence_parallel=true"], 1, r"sequence_parallel=true needs parallel\.tp >= 2"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1,
     r"global_batch_size \(6\) % \(micro_batch_size \(4\) \* dp \(1\)\) = 2"),
    (["parallel.dp=4"], 2, r"tp\(1\) \* pp\(1\) \* cp\(1\) \* dp\(4\) = 4 != world size \(2\)"),
])
def test_impossible_layouts_show_the_arithmetic(overrides, world, message):
    cfg = load_config(overrides=["model.preset=tiny", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world, check_paths=False)


def test_missing_data_path_names_the_prefix_and_the_fix(tmp_path):
    cfg = load_config(overrides=["model.preset=tiny", f"data.paths=[{tmp_path}/nope]"])
    with pytest.raises(ConfigError, match=r"nope.*has no .*nope\.bin.*flagscale preprocess"):
        validate(cfg, world_size=1)


def test_cli_reports_config_errors_in_one_paragraph_before_launching(tmp_path, capsys):
    cfg = _write(tmp_path, {"model": {"preset": "tiny"}, "data": {"paths": [str(tmp_path / "x")]}})
    assert main(["train", cfg, "--nproc", "2", "parallel.tpp=2"]) == 1
    err = capsys.readouterr().err
    assert "Did you mean 'parallel.tp'" in err and "Traceback" not in err
    assert main(["train", cfg, "--nproc", "2"]) == 1
    assert "has no" in capsys.readouterr().err


def test_dry_run_prints_resolved_config_and_layout(tmp_path, capsys, tiny_corpus, tiny_tokenizer):
    cfg = _write(tmp_path, {"model": {"preset": "tiny"}, "parallel": {"tp": 2},
                            "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer}})
    assert main(["train", cfg, "--dry-run", "train.global_batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "world=2 tp=2 pp=1 dp=1 microbatches/step=4" in out
    assert yaml.safe_load(out)["train"]["global_batch_size"] == 4


def test_tokenizer_larger_than_the_model_vocabulary_is_refused_before_launch(
        tmp_path, capsys, tiny_corpus, tiny_tokenizer):
    cfg = _write(tmp_path, {"model": {"preset": "tiny", "vocab_size": 1000},
                            "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer}})
    assert main(["train", cfg, "--nproc", "1"]) == 1
    assert "has 4096 tokens but model.vocab_size is 1000" in capsys.readouterr().err



@pytest.mark.parametrize("overrides, message", [
    (["trace.window=0"], r"trace\.window \(0\) must be at least 1"),
    (["trace.spike_factor=0"], r"trace\.spike_factor \(0\.0\) must be > 0"),
    (["trace.max_reports=-1"], r"trace\.max_reports must be >= 0, got -1"),
    (["trace.text_chars=-5"], r"trace\.text_chars must be >= 0, got -5"),
    (["metrics.peak_tflops=0"], r"metrics\.peak_tflops must be positive"),
    (["checkpoint.keep_last=0"], r"checkpoint\.keep_last must be at least 1"),
    (["checkpoint.save_interval=-1"], r"checkpoint\.save_interval must be >= 0"),
    (["train.log_interval=0"], r"train\.log_interval must be at least 1, got 0"),
    (["train.eval_interval=-2"], r"train\.eval_interval must be >= 0"),
    (["train.stop_iteration=11"], r"train\.stop_iteration \(11\) must lie in 1\.\.train\."
                                  r"iterations \(10\)"),
    (["data.skip_iterations=[0]"], r"data\.skip_iterations \[0\] are not iterations of the run"),
    (["data.split=a,b"], r"data\.split='a,b' must be up to three non-negative"),
    (["data.split=0,100,0"], r"gives the train split 0 of the documents"),
    (["train.eval_interval=2", "data.split=100,0,0"],
     r"train\.eval_interval=2 evaluates on the validation split, but data\.split='100,0,0' gives "
     r"it 0% of the documents"),
])
def test_every_section_is_validated_before_launch(overrides, message):
    cfg = load_config(overrides=["model.preset=tiny", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=1, check_paths=False)


def test_evaluation_with_a_validation_split_is_accepted():
    cfg = load_config(overrides=["model.preset=tiny", "train.eval_interval=2",
                                 "data.split=98/2/0"])
    validate(cfg, world_size=1, check_paths=False)


def test_trace_error_stops_the_cli_before_any_worker_starts(tmp_path, tiny_corpus):
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    cfg = _write(tmp_path, {"model": {"preset": "tiny"}, "data": {"paths": [tiny_corpus]},
                            "run": {"dir": str(run_dir)}})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flagscale", "train", cfg, "trace.window=0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr  # one paragraph, no traceback
    assert proc.stderr.startswith("flagscale train: error: trace.window (0) must be at least 1")
    assert "torch.distributed" not in proc.stderr and not run_dir.exists()
    # No torchrun: a launch alone takes longer than this, before any worker reports.
    assert time.perf_counter() - start < 10

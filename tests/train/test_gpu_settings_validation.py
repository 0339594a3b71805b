"""Settings of the GPU path are checked before any process starts, with the arithmetic: uneven
pipeline splits, context parallelism, recomputation, overlap and FP8."""

from __future__ import annotations

import pytest
import torch

from flagscale.config import load_config, pipeline_split, validate
from flagscale.errors import ConfigError


def _cfg(*overrides):
    return load_config(None, ["model.preset=llama3_1_405b", "model.params_dtype=bf16",
                              "train.seq_length=8192", "train.global_batch_size=512",
                              "parallel.tp=8", "parallel.sequence_parallel=true", *overrides])


def test_405b_counts_embedding_and_loss_as_layers_over_eight_stages():
    cfg = _cfg("parallel.pp=8", "parallel.vpp=8", "parallel.cp=2",
               "parallel.account_for_embedding_in_pipeline_split=true",
               "parallel.account_for_loss_in_pipeline_split=true")
    layout = validate(cfg, 1024, check_paths=False)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.vpp) == (8, 8, 2, 8, 8)
    # (126 + 2) / 8 = 16 per rank; the first and last give one slot to embedding and loss.
    assert pipeline_split(cfg, layout.dims) == (15, 16, 16, 16, 16, 16, 16, 15)


def test_even_split_error_names_the_arithmetic_and_the_uneven_options():
    with pytest.raises(ConfigError, match=r"model.num_layers \(126\) % parallel.pp \(8\) = 6: "
                                          r".*num_layers_in_first/last_pipeline_stage"):
        validate(_cfg("parallel.pp=8"), 1024, check_paths=False)


def test_first_and_last_stage_sizes():
    cfg = _cfg("parallel.pp=8", "parallel.num_layers_in_first_pipeline_stage=15",
               "parallel.num_layers_in_last_pipeline_stage=15")
    assert pipeline_split(cfg, validate(cfg, 1024, check_paths=False).dims) == (
        15, 16, 16, 16, 16, 16, 16, 15)
    with pytest.raises(ConfigError, match=r"model.num_layers \(126\) - first \(14\) - last \(15\) = 97 layers "
                                          r"over 6 middle stage"):
        validate(_cfg("parallel.pp=8", "parallel.num_layers_in_first_pipeline_stage=14",
                      "parallel.num_layers_in_last_pipeline_stage=15"), 1024, check_paths=False)
    with pytest.raises(ConfigError, match=r"num_layers_in_first_pipeline_stage \(15\) must be a "
                                          r"positive multiple of parallel.vpp \(2\)"):
        validate(_cfg("parallel.pp=8", "parallel.vpp=2",
                      "parallel.num_layers_in_first_pipeline_stage=15"), 1024, check_paths=False)
    with pytest.raises(ConfigError, match=r"\(model.num_layers \(126\) \+ embedding \(1\) = 127\) "
                                          r"% parallel.pp \(8\) = 7"):
        validate(_cfg("parallel.pp=8", "parallel.account_for_embedding_in_pipeline_split=true"),
                 1024, check_paths=False)
    with pytest.raises(ConfigError, match="megatron-core accepts only one"):
        validate(_cfg("parallel.pp=8", "parallel.num_layers_in_first_pipeline_stage=15",
                      "parallel.account_for_loss_in_pipeline_split=true"), 1024,
                 check_paths=False)


def test_context_parallel_sequence_and_world_arithmetic():
    with pytest.raises(ConfigError, match=r"train.seq_length \(8200\) % \(2 \* parallel.cp \(2\) "
                                          r"\* parallel.tp \(8\)\) = 8: .*multiple of 32"):
        validate(_cfg("parallel.pp=9", "parallel.cp=2", "train.seq_length=8200"), 144,
                 check_paths=False)
    with pytest.raises(ConfigError, match=r"tp\(8\) \* pp\(9\) \* cp\(2\) \* dp\(\?\) != world "
                                          r"size \(1000\)"):
        validate(_cfg("parallel.pp=9", "parallel.cp=2"), 1000, check_paths=False)
    assert validate(_cfg("parallel.pp=9", "parallel.cp=2"), 144 * 2, check_paths=False).dp == 2


@pytest.mark.parametrize("overrides,message", [
    (["train.recompute_modules=[mlp]"], r"needs train.recompute=selective"),
    (["train.recompute=selective", "train.recompute_modules=[attention]"], r"unknown: \['attention'\]"),
    (["train.recompute=full", "train.recompute_num_layers=15"], r"must lie in 1..14"),
    (["model.fp8=e5m2"], r"model.fp8='e5m2' is not one of hybrid, e4m3"),
    (["model.fp8=hybrid", "model.params_dtype=fp32"], r"needs model.params_dtype=bf16"),
    (["parallel.tp_comm_overlap=true", "parallel.sequence_parallel=false"],
     r"needs parallel.tp >= 2 \(got 8\) and parallel.sequence_parallel=true \(got False\)"),
    (["parallel.overlap_p2p_comm=true"], r"needs parallel.vpp >= 2"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"],
     r"needs parallel.distributed_optimizer=true"),
    (["train.manual_gc_interval=-1"], r"must be >= 0"),
    (["train.recompute_method=random"], r"train.recompute_method='random' is not one of"),
])
def test_performance_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg("parallel.pp=9", *overrides), 72, check_paths=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_context_parallel_is_refused_before_launch_without_transformer_engine(
        tmp_path, tiny_corpus, tiny_tokenizer):
    from tests.dist import run_cli

    proc = run_cli("train", "examples/tiny/config.yaml", "--nproc", "2", "parallel.cp=2", "parallel.dp=1",
                   f"data.paths=[{tiny_corpus}]", f"data.tokenizer={tiny_tokenizer}",
                   f"run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert ("parallel.cp=2 (megatron-core's context-parallel attention is Transformer Engine's"
            in proc.stderr + proc.stdout)
    assert "needs Transformer Engine, but the cpu platform has none" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

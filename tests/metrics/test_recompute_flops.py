"""Hardware FLOPs (HFU) count the recomputation the run really does: the layers and modules
megatron-core recomputes under ``train.recompute``, ``recompute_method``, ``recompute_num_layers``
and ``recompute_modules``, the same layers the memory planner stops storing."""

from __future__ import annotations

import pytest

from flagscale.config import load_config, validate
from flagscale.metrics import flops_for_config
from flagscale.plan.memory import estimate_memory


def _config(*overrides: str):
    cfg = load_config(overrides=["model.preset=llama3_8b", "train.seq_length=8192",
                                 "train.global_batch_size=64", *overrides])
    # 16 data-parallel replicas of whatever pipeline the overrides ask for.
    validate(cfg, 16 * cfg.parallel.pp, check_paths=False)
    return cfg


def _repeated(cfg) -> float:
    return flops_for_config(cfg).recompute_flops_per_token


def test_full_recompute_counts_the_recomputed_layers_of_each_stage():
    terms = flops_for_config(_config()).terms
    # One layer's forward: a third of its forward+backward terms, over 32 layers.
    layer = sum(terms[k] for k in ("qkv", "attention", "out_proj", "mlp")) / 3 / 32
    uniform = _config("parallel.pp=4", "train.recompute=full", "train.recompute_num_layers=2")
    assert _repeated(uniform) == pytest.approx(32 * layer)  # every layer, in groups of 2
    # block: the first 2 layers of each of 4 stages of 8.
    block = _config("parallel.pp=4", "train.recompute=full", "train.recompute_method=block",
                    "train.recompute_num_layers=2")
    assert _repeated(block) == pytest.approx(8 * layer)
    # With 2 virtual stages per rank each of the 4 chunks (of 8 layers) recomputes its first 2.
    virtual = _config("parallel.pp=2", "parallel.vpp=2", "train.recompute=full",
                      "train.recompute_method=block", "train.recompute_num_layers=2")
    assert _repeated(virtual) == pytest.approx(8 * layer)
    # Uneven split 4 + 14 + 14: block 3 recomputes 3 layers of every stage.
    uneven = _config("parallel.pp=3", "parallel.num_layers_in_first_pipeline_stage=4",
                     "train.recompute=full", "train.recompute_method=block",
                     "train.recompute_num_layers=3")
    assert _repeated(uneven) == pytest.approx(9 * layer)
    assert flops_for_config(block).flops_per_token == flops_for_config(_config()).flops_per_token


def test_the_planner_stops_storing_exactly_the_layers_hfu_recomputes():
    # Each layer block recomputes keeps only its input: going from 2 to 4 recomputed layers per
    # stage saves 2 * 4 stages' worth of stored layers, and HFU doubles its repeated work.
    def plan(layers: int):
        cfg = _config("parallel.pp=4", "train.recompute=full", "train.recompute_method=block",
                      f"train.recompute_num_layers={layers}")
        return estimate_memory(cfg, tp=1, pp=4, dp=16, sequence_parallel=False), cfg

    (two, two_cfg), (four, four_cfg) = plan(2), plan(4)
    assert four.activations < two.activations
    assert _repeated(four_cfg) == pytest.approx(2 * _repeated(two_cfg))


def test_selective_recompute_counts_the_listed_modules():
    terms = flops_for_config(_config()).terms
    assert _repeated(_config("train.recompute=selective")) == pytest.approx(
        terms["attention"] / 3)  # core_attn, megatron-core's default module
    assert _repeated(_config("train.recompute=selective",
                             "train.recompute_modules=[layernorm,mlp]")) == pytest.approx(
        terms["mlp"] / 3)  # the Megatron convention counts no norm FLOPs
    assert _repeated(_config()) == 0.0


def test_the_flops_report_of_a_config_counts_its_recompute(tmp_path):
    from flagscale.metrics.report import flops_for

    config = tmp_path / "block.yaml"
    config.write_text("model: {preset: llama3_8b}\nparallel: {pp: 4}\n"
                      "train: {seq_length: 8192, recompute: full, recompute_method: block, "
                      "recompute_num_layers: 2}\n")
    cfg = _config("parallel.pp=4", "train.recompute=full", "train.recompute_method=block",
                  "train.recompute_num_layers=2")
    report = flops_for(str(config), None)
    assert report["hardware_flops_per_token"] == flops_for_config(cfg).hardware_flops_per_token
    # --recompute full overrides the config's method: every layer.
    every = flops_for(str(config), None, recompute="full")
    assert every["recompute_flops_per_token"] == pytest.approx(4 * _repeated(cfg))

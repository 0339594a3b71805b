"""FLOPs per token and parameter counts against published figures and a real FLOP counter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flagscale.config import load_config
from flagscale.errors import ConfigError
from flagscale.metrics import count_params, flops_for_config, flops_per_token, preset_model


@pytest.mark.parametrize("preset, gflops", [("llama3_8b", 51.47), ("llama3_70b", 449.22),
                                            ("llama3_1_405b", 2523.96)])
def test_megatron_convention_reproduces_reference_values(preset, gflops):
    # REFERENCE section 3: Megatron-LM's num_floating_point_operations at S=8192 (tp=1).
    estimate = flops_per_token(preset_model(preset), seq_length=8192)
    assert estimate.convention == "megatron" and estimate.causal
    assert f"{estimate.flops_per_token / 1e9:.4g}" == f"{gflops:.4g}"
    assert estimate.flops_per_token == sum(estimate.terms.values())
    assert list(estimate.terms) == ["qkv", "attention", "out_proj", "mlp", "logits"]


def test_breakdown_terms_of_llama3_8b():
    terms = flops_per_token(preset_model("llama3_8b"), 8192).terms
    h, q, kv, ffn, layers, vocab, seq = 4096, 4096, 1024, 14336, 32, 128256, 8192
    assert terms["qkv"] == 6 * layers * h * (q + 2 * kv)
    assert terms["attention"] == 6 * layers * q * seq        # causal: half of 12*L*q*S
    assert terms["out_proj"] == 6 * layers * q * h
    assert terms["mlp"] == 6 * layers * 3 * h * ffn         # SwiGLU: gate, up, down
    assert terms["logits"] == 6 * h * vocab


def test_palm_and_6n_conventions():
    model = preset_model("llama3_8b")
    palm = flops_per_token(model, 8192, convention="palm")
    assert round(palm.flops_per_token / 1e9, 2) == 57.91
    assert not palm.causal
    six_n = flops_per_token(model, 8192, convention="6n")
    assert six_n.flops_per_token == 6 * count_params(model).non_embedding
    assert palm.flops_per_token - six_n.flops_per_token == 12 * 32 * 32 * 128 * 8192


def test_parameter_counts_match_published_sizes():
    assert count_params(preset_model("llama3_8b")).total == 8_030_261_248
    assert count_params(preset_model("llama3_70b")).total == 70_553_706_496
    assert count_params(preset_model("llama3_1_405b")).total == 405_853_388_800
    params = count_params(preset_model("llama3_8b"))
    assert params.embedding == 128256 * 4096
    assert params.total == params.embedding + params.non_embedding
    assert params.non_embedding == 32 * params.per_layer + 4096 + 128256 * 4096


def test_vocabulary_padded_to_multiple_of_128_times_tp():
    model = preset_model("llama3_8b")
    # 128256 is a multiple of 128 but not of 128*8: tp=8 pads to 129024 rows of logits.
    assert flops_per_token(model, 8192, tp=8).vocab_size == 129024
    assert flops_per_token(model, 8192, tp=8).terms["logits"] == 6 * 4096 * 129024
    assert flops_per_token(preset_model("aquila2_7b"), 4096).vocab_size == 100096


def test_recomputation_is_hardware_flops_only():
    model = preset_model("llama3_8b")
    plain = flops_per_token(model, 8192)
    full = flops_per_token(model, 8192, recompute="full")
    selective = flops_per_token(model, 8192, recompute="selective")
    assert full.flops_per_token == selective.flops_per_token == plain.flops_per_token
    layers = plain.flops_per_token - plain.terms["logits"]
    assert full.hardware_flops_per_token == pytest.approx(plain.flops_per_token + layers / 3)
    assert selective.hardware_flops_per_token == pytest.approx(
        plain.flops_per_token + plain.terms["attention"] / 3)


def test_config_supplies_sequence_tp_and_recompute(tmp_path):
    cfg = load_config(None, ["model.preset=llama3_8b", "train.seq_length=4096",
                             "parallel.tp=8", "train.recompute=full"])
    estimate = flops_for_config(cfg)
    assert estimate.flops_per_token == flops_per_token(cfg.model, 4096, tp=8).flops_per_token
    assert estimate.recompute == "full"
    assert estimate.hardware_flops_per_token > estimate.flops_per_token


def test_bad_inputs_raise_config_errors():
    with pytest.raises(ConfigError, match="convention 'kaplan'"):
        flops_per_token(preset_model("tiny"), 128, convention="kaplan")
    with pytest.raises(ConfigError, match="model.num_layers is 0"):
        flops_per_token(load_config(None).model, 128)
    with pytest.raises(ConfigError, match="Unknown model preset 'llama4'"):
        preset_model("llama4")


def test_analytic_matmul_flops_match_flop_counter_on_real_tiny_model():
    """One forward+backward of megatron-core's tiny GPTModel under FlopCounterMode.

    megatron-core's local (no Transformer Engine) attention multiplies the full S x S score
    matrix and masks it afterwards, so the counter sees full attention: compare with causal=False.
    """
    seq, batch = 128, 2
    worker = Path(__file__).with_name("flop_count_worker.py")
    out = subprocess.run([sys.executable, str(worker), str(seq), str(batch)], check=True,
                         capture_output=True, text=True, timeout=300)
    counted = json.loads(out.stdout.strip().splitlines()[-1])
    analytic = flops_per_token(preset_model("tiny"), seq, causal=False)
    tokens = counted["tokens"]
    assert counted["total"] == pytest.approx(analytic.flops_per_token * tokens, rel=0.01)
    attention = counted["by_op"].get("aten.bmm", 0) + counted["by_op"].get("aten.baddbmm", 0)
    assert attention == pytest.approx(analytic.terms["attention"] * tokens, rel=0.01)
    # The causal (Megatron) figure is lower by exactly half the attention term.
    causal = flops_per_token(preset_model("tiny"), seq)
    assert causal.flops_per_token == analytic.flops_per_token - analytic.terms["attention"] / 2

"""The memory planner: hand-computed numbers, the published Aquila2-34B layout, JSON and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flagscale.cli.main import main
from flagscale.config import load_config
from flagscale.errors import ConfigError
from flagscale.plan import estimate_memory, plan_for, plan_layouts, usable_gib

GIB = 2 ** 30
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def llama3_8b(seq=8192):
    cfg = load_config(None, ["model.preset=llama3_8b", "model.params_dtype=bf16",
                             f"train.seq_length={seq}", "train.micro_batch_size=1"])
    return cfg


def test_llama3_8b_model_state_by_hand():
    """tp1 pp1 dp8: 2 B weights, 4 B fp32 grad buffer, 12 B Adam+master sharded over 8 ranks."""
    h, layers, ffn, vocab, q, kv = 4096, 32, 14336, 128256, 4096, 1024
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * ffn + 2 * h
    n = 2 * vocab * h + layers * per_layer + h
    assert n == 8_030_261_248  # the published 8.03B
    est = estimate_memory(llama3_8b(), tp=1, pp=1, dp=8, sequence_parallel=False)
    assert est.params == 2 * n
    assert est.grads == 4 * n
    assert est.optimizer == 12 * n / 8
    assert est.as_dict()["optimizer"] == round(12 * n / 8 / GIB, 3) == 11.218


def test_llama3_8b_activations_match_korthikanti_34sbh():
    """With GQA (g/a = 1/4) and SwiGLU (f = 3.5h) a Llama-3-8B layer keeps 34*s*b*h bytes, the
    Korthikanti et al. figure, plus flash attention's fp32 log-sum-exp; the last stage adds the
    final-norm/output-layer inputs and the fp32 softmax of the logits."""
    s, h, a, layers, vocab = 8192, 4096, 32, 32, 128256
    per_layer = 34 * s * h + 4 * a * s
    logits = 2 * s * h * 2 + 4 * s * vocab
    est = estimate_memory(llama3_8b(), tp=1, pp=1, dp=8, sequence_parallel=False)
    assert est.activations == layers * per_layer + logits
    unfused = estimate_memory(llama3_8b(), tp=1, pp=1, dp=8, sequence_parallel=False,
                              attention="unfused")
    # Unfused attention keeps the a*s*s score matrix in fp32 and bf16 (6 bytes) instead.
    assert unfused.activations - est.activations == layers * (6 * a * s * s - 4 * a * s)
    selective = estimate_memory(llama3_8b(), tp=1, pp=1, dp=8, sequence_parallel=False,
                                recompute="selective", attention="unfused")
    assert selective.activations == layers * 34 * s * h + logits
    full = estimate_memory(llama3_8b(), tp=1, pp=1, dp=8, sequence_parallel=False,
                           recompute="full")
    assert full.activations == layers * 2 * s * h + per_layer + logits


def test_pipeline_first_stage_holds_pp_microbatches():
    cfg = llama3_8b()
    est = estimate_memory(cfg, tp=2, pp=4, dp=1, sequence_parallel=True)
    two = estimate_memory(cfg, tp=2, pp=4, dp=1, sequence_parallel=True, num_microbatches=2)
    assert est.stage == two.stage == "first"
    # 4 microbatches of 8 layers in flight vs 2 (a step of only 2): SP divides each by tp=2.
    per_mb = 8 * (34 * 8192 * 4096 + 4 * 32 * 8192) / 2
    assert est.activations - two.activations == pytest.approx(2 * per_mb)


def test_aquila2_34b_recipe_layout_fits_on_512_gpus():
    plan = plan_for(str(EXAMPLES / "aquila2_34b" / "h100_64nodes.yaml"), None, 512)
    recipe = [lay for lay in plan.layouts if (lay.tp, lay.pp, lay.dp) == (4, 4, 32)]
    assert len(recipe) == 1 and recipe[0].fits and recipe[0].configured
    assert recipe[0].sequence_parallel
    assert 20 < recipe[0].memory.total_gib < 32
    # DP512 cannot split the ramp-up's first batch of 32 sequences: TP1 PP1 is no layout of the
    # recipe; without the ramp it is one, and does not fit.
    assert not [lay for lay in plan.layouts if (lay.tp, lay.pp) == (1, 1)]
    no_ramp = plan_for(str(EXAMPLES / "aquila2_34b" / "h100_64nodes.yaml"), None, 512,
                       overrides=("train.rampup_batch_size=null",))
    unsharded = [lay for lay in no_ramp.layouts if (lay.tp, lay.pp) == (1, 1)]
    assert unsharded and not unsharded[0].fits
    # The recipe ran on A100-40G: it must fit there too.
    a100 = plan_for(None, "aquila2_34b", 512, device="a100-40g")
    assert any((lay.tp, lay.pp) == (4, 4) and lay.fits for lay in a100.layouts)
    assert plan.best.fits and all(lay.fits for lay in plan.layouts[:plan.layouts.index(recipe[0])])


def test_405b_does_not_fit_on_8_gpus(capsys):
    plan = plan_for(None, "llama3_1_405b", 8)
    assert plan.best is None and plan.layouts and not any(lay.fits for lay in plan.layouts)
    assert main(["plan", "--model", "llama3_1_405b", "--gpus", "8"]) == 1
    out, err = capsys.readouterr()
    assert "no layout fits" in out  # the table is still shown
    assert re.search(r"error: No layout of llama3_1_405b fits on 8 x h100-sxm: the smallest needs "
                     r"\d+\.\d GiB per GPU, 69\.3 are usable\. Raise --gpus", err), err
    assert main(["plan", "--model", "llama3_1_405b", "--gpus", "8", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["layouts"]


def test_json_has_the_contract_keys(capsys):
    assert main(["plan", "--model", "llama3_8b", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 8_030_261_248
    assert data["layouts"]
    for lay in data["layouts"]:
        assert {"tp", "pp", "dp", "memory_gib_per_gpu", "fits"} <= set(lay)
        assert lay["tp"] * lay["pp"] * lay["dp"] == 8
        mem = lay["memory_gib_per_gpu"]
        assert set(mem) == {"params", "grads", "optimizer", "activations", "total"}
        assert mem["total"] == pytest.approx(sum(mem[k] for k in mem if k != "total"), abs=0.01)
        assert lay["fits"] == (mem["total"] <= data["usable_gib"])
    fits = [lay["fits"] for lay in data["layouts"]]
    assert fits == sorted(fits, reverse=True)  # layouts that fit come first


def test_device_budget_keeps_a_margin():
    assert usable_gib("h100-sxm") == pytest.approx((80 - 3) * 0.9)
    budgets = [usable_gib(d) for d in ("h200", "h100-nvl", "h100-sxm", "a100-40g")]
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 4
    with pytest.raises(ConfigError, match="Unknown device 'v100'"):
        usable_gib("v100")


def test_errors(capsys):
    assert main(["plan", "--model", "llama3_9b", "--gpus", "8"]) == 1
    assert "not a known preset" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="No parallel layout"):
        # 1024 sequences cannot be split over 7 data-parallel ranks, and 7 divides no tp*pp.
        plan_for(str(EXAMPLES / "aquila2_34b" / "h100_64nodes.yaml"), None, 7)
    with pytest.raises(ConfigError, match="at least 1"):
        plan_layouts(llama3_8b(), 0)
    with pytest.raises(ConfigError, match="exactly one of CONFIG"):
        plan_for(None, None, 8)

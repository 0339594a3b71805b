"""Every shipped large-model example loads, validates for the world size it is named for, and
fits according to the planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale.config import load_config, validate
from flagscale.plan import plan_layouts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CASES = [("aquila2_34b/h100_64nodes.yaml", 64 * 8, (4, 4, 32)),
         ("llama3_8b/h100_1node.yaml", 8, (2, 1, 4)),
         ("llama3_1_405b/h100_144nodes.yaml", 144 * 8, (8, 6, 24)),
         # The anchors' H100 layouts (NeMo / Megatron-Bridge recipes), with (tp, pp, dp, cp, vpp).
         ("llama3_8b/h100_1node_cp2.yaml", 8, (1, 1, 4, 2, None)),
         ("llama3_70b/h100_8nodes.yaml", 64, (4, 4, 2, 2, 5)),
         ("llama3_1_405b/h100_128nodes.yaml", 1024, (8, 8, 8, 2, 8)),
         ("aquila2_34b/h100_16nodes_vpp.yaml", 128, (4, 2, 16, 1, 3)),
         ("llama3_1_8b/h100_4nodes_128k.yaml", 32, (4, 1, 1, 8, None))]


@pytest.mark.parametrize("name,world,layout", CASES)
def test_example_validates_and_fits(name, world, layout):
    cfg = load_config(EXAMPLES / name)
    got = validate(cfg, world, check_paths=False)
    assert (got.tp, got.pp, got.dp, got.cp, got.vpp)[:len(layout)] == layout
    assert cfg.model.params_dtype == "bf16" and cfg.parallel.distributed_optimizer
    configured = [lay for lay in plan_layouts(cfg, world, device=cfg.metrics.device).layouts
                  if lay.configured]
    assert len(configured) == 1 and configured[0].fits


def test_aquila2_34b_recipe_conversion():
    """Sample counts of the FlagScale v0.1 recipe converted to iterations through its batch-size
    ramp-up (32 -> 1024 by 32 over 2M samples), as megatron-core's calculator sizes the steps."""
    from flagscale.data.datasets import BatchSchedule

    cfg = load_config(EXAMPLES / "aquila2_34b/h100_64nodes.yaml")
    t = cfg.train
    assert (t.global_batch_size, t.micro_batch_size, t.seq_length) == (1024, 1, 4096)
    assert t.rampup_batch_size == [32, 32, 2_000_000]
    samples = BatchSchedule.for_training(cfg, 32).start  # samples before an iteration
    assert samples(t.iterations) <= 488_281_250 < samples(t.iterations + 1)
    assert samples(t.warmup_iterations - 1) < 500_000 <= samples(t.warmup_iterations)
    assert (t.lr, t.min_lr, t.lr_decay_style) == (1.5e-4, 1.5e-5, "cosine")
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.parallel.sequence_parallel and cfg.model.init_method_std == 0.0165


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_leaves_dp_to_the_world_size(path):
    # A pinned dp makes `--nproc N parallel.tp=2` fail its own arithmetic (the README's command).
    cfg = load_config(path)
    assert cfg.parallel.dp is None
    if cfg.model.preset == "tiny":
        assert validate(load_config(path, ["parallel.tp=2"]), 2, check_paths=False).dp == 1

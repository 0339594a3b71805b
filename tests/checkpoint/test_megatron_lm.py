"""Megatron-LM checkpoints in: ``flagscale reshard`` and ``convert mcore-to-hf`` on Megatron-LM's
legacy (``mp_rank_*`` + ``distrib_optim.pt``) and ``torch_dist`` checkpoints.

A tiny run at TP=2 (distributed optimizer) saves iteration 3 and goes on to 5; its losses at 4
and 5 are the reference (the loss at 5 follows the update at 4, which the optimizer state, the
step count and the LR schedule decide). Its iteration-3 state is then written the way Megatron-LM's
``megatron/training/checkpointing.py`` writes it, by megatron-core's own functions on 2 gloo
processes at TP=2: ``model_optim_rng.pt`` (args Namespace, model state dict, optimizer param
groups, a scheduler counting samples) with ``DistributedOptimizer.save_parameter_state``'s
``distrib_optim.pt``, and a ``torch_dist`` checkpoint with ``args`` in its common state. Resumed in
flagscale at other layouts, both must give the reference loss.
"""

from __future__ import annotations

import json
import random
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from flagscale.errors import CheckpointError
from tests.dist import run_cli, run_distributed, run_losses, tiny_config

SAVED, LAST = 3, 5


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """A TP=2 run saving iteration 3, and its losses at iterations 4 and 5."""
    tmp = tmp_path_factory.mktemp("megatron_lm")
    config = tiny_config(tmp / "source.yaml", tiny_corpus, tiny_tokenizer, tmp / "source",
                         parallel={"tp": 2},
                         train={"seq_length": 64, "iterations": LAST, "lr": 2e-3, "min_lr": 2e-4,
                                "warmup_iterations": 1},
                         checkpoint={"save_interval": SAVED, "save_final": False})
    run_cli("train", config)
    return {"tmp": tmp, "config": config, "tokenizer": tiny_tokenizer,
            "checkpoint": tmp / "source" / "checkpoints" / f"iter_{SAVED:07d}",
            "losses": {i: loss for i, loss in run_losses(tmp / "source").items() if i > SAVED}}


def _megatron_args(cfg, layout, consumed: int, tokenizer: str, ckpt_format: str) -> Namespace:
    """The arguments Megatron-LM's pretrain_gpt.py records for this tiny Llama run."""
    m, t = cfg.model, cfg.train
    return Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=True,
        num_query_groups=m.num_query_groups, kv_channels=layout.kv_channels,
        seq_length=t.seq_length, max_position_embeddings=m.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(m.rope_theta), rotary_percent=1.0,
        use_rope_scaling=False, normalization="RMSNorm", norm_epsilon=m.norm_epsilon,
        swiglu=True, add_bias_linear=False, add_qkv_bias=False,
        untie_embeddings_and_output_weights=True, init_method_std=m.init_method_std,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        padded_vocab_size=layout.padded_vocab_size, vocab_size=None,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
        data_parallel_size=layout.dims.dp, world_size=layout.dims.world_size,
        sequence_parallel=False, use_distributed_optimizer=True, overlap_grad_reduce=False,
        ddp_bucket_size=None, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, rampup_batch_size=None, train_iters=t.iterations,
        lr=t.lr, min_lr=t.final_lr, lr_decay_style=t.lr_decay_style,
        lr_warmup_iters=t.warmup_iterations, lr_decay_iters=None,
        weight_decay=t.weight_decay, start_weight_decay=t.weight_decay,
        end_weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps, clip_grad=t.clip_grad, seed=t.seed, bf16=False, fp16=False,
        consumed_train_samples=consumed, ckpt_format=ckpt_format)


def _write_megatron_lm(checkpoint: Path, config: Path, tokenizer: str, legacy_root: Path,
                       dist_root: Path) -> None:
    """One rank of a TP=2 world: load the flagscale checkpoint, write it in both Megatron-LM
    formats with megatron-core's functions."""
    import numpy as np
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from flagscale.checkpoint import load_checkpoint
    from flagscale.checkpoint.state import model_sharded_state
    from flagscale.config import load_config, validate
    from flagscale.platform import setup_platform
    from flagscale.train.setup import build_training, init_model_parallel, init_process_group

    cfg = load_config(config, ["parallel.tp=2", "parallel.dp=1"])
    platform = setup_platform(cfg.platform)
    init_process_group(platform)
    layout = validate(cfg, 2, check_paths=False)
    init_model_parallel(cfg, layout)
    t = build_training(cfg, layout, platform)
    loaded = load_checkpoint(checkpoint, t.model, t.optimizer, t.scheduler, cfg.model, layout)
    iteration = loaded["iteration"]
    # Megatron-LM steps its scheduler by the global batch size every iteration.
    scheduler = t.scheduler.state_dict()
    for key in ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps"):
        scheduler[key] *= cfg.train.global_batch_size
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    rank_dir = legacy_root / f"iter_{iteration:07d}" / f"mp_rank_{tp_rank:02d}"
    rank_dir.mkdir(parents=True)
    torch.save({"args": _megatron_args(cfg, layout, loaded["consumed_samples"], tokenizer,
                                       "torch"),
                "checkpoint_version": 3.0, "iteration": iteration,
                "model": t.model[0].state_dict_for_save_checkpoint(),
                "optimizer": t.optimizer.state_dict(), "opt_param_scheduler": scheduler,
                "rng_state": [{"random_rng_state": random.getstate(),
                               "np_rng_state": np.random.get_state(),
                               "torch_rng_state": torch.get_rng_state(),
                               "rng_tracker_states": get_cuda_rng_tracker().get_states()}],
                "num_floating_point_operations_so_far": 0}, rank_dir / "model_optim_rng.pt")
    t.optimizer.save_parameter_state(str(rank_dir / "distrib_optim.pt"))

    sharding = {"distrib_optim_sharding_type": "dp_reshardable"}  # Megatron-LM's default
    state = model_sharded_state(t.model)
    state["optimizer"] = t.optimizer.sharded_state_dict(state, metadata=sharding)
    state.update(args=_megatron_args(cfg, layout, loaded["consumed_samples"], tokenizer,
                                     "torch_dist"),
                 checkpoint_version=3.0, iteration=iteration, opt_param_scheduler=scheduler)
    iter_dir = dist_root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        iter_dir.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(iter_dir), content_metadata=sharding)
    if dist.get_rank() == 0:
        for root in (legacy_root, dist_root):
            (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()


@pytest.fixture(scope="module")
def megatron_lm(source):
    tmp = source["tmp"]
    run_distributed(_write_megatron_lm, 2, source["checkpoint"], source["config"],
                    source["tokenizer"], tmp / "megatron_legacy", tmp / "megatron_dist")
    return {"legacy": tmp / "megatron_legacy", "torch_dist": tmp / "megatron_dist"}


def _assert_resumes_like_continuing(source: dict, name: str, checkpoint: Path,
                                    *layout: str) -> None:
    """The converted checkpoint holds the source's iteration, samples and LR schedule (in
    iterations), and a flagscale run from it at ``layout`` has the source's losses."""
    from flagscale.checkpoint import read_run_state

    saved, converted = read_run_state(source["checkpoint"]), read_run_state(checkpoint)
    for key in ("iteration", "consumed_samples", "scheduler"):
        assert converted[key] == saved[key], key
    run_dir = source["tmp"] / name
    run_cli("train", source["config"], *layout, f"checkpoint.load={checkpoint}",
            "checkpoint.save_interval=0", f"run.dir={run_dir}")
    losses = run_losses(run_dir)
    assert sorted(losses) == sorted(source["losses"]) == [SAVED + 1, LAST], name
    for iteration, loss in source["losses"].items():
        assert losses[iteration] == pytest.approx(loss, rel=1e-5), (name, iteration)


def test_legacy_checkpoint_resumes_at_tp1_pp2_like_continuing_at_tp2(source, megatron_lm):
    out = source["tmp"] / "legacy_tp1pp2"
    proc = run_cli("reshard", "--input", megatron_lm["legacy"], "--output", out, "--tp", "1",
                   "--pp", "2")
    assert ("detected a Megatron-LM legacy (--ckpt-format torch, mp_rank_* with "
            "distrib_optim.pt) checkpoint") in proc.stdout
    assert "saved at tp=2 pp=1 dp=1" in proc.stdout
    assert "-> tp=1 pp=2 dp=1" in proc.stdout
    assert not list(out.parent.glob(".legacy_tp1pp2.megatron-lm*"))
    _assert_resumes_like_continuing(source, "legacy_tp1pp2_run", out, "parallel.tp=1",
                                    "parallel.pp=2", "parallel.dp=1")


def test_torch_dist_checkpoint_resumes_at_tp1_dp2_like_continuing_at_tp2(source, megatron_lm):
    from flagscale.train.megatron_lm_import import convert_rank, converted, write_plan

    lines: list[str] = []
    plan, dims = write_plan(megatron_lm["torch_dist"], source["tmp"] / "dist_import",
                            log=lines.append)
    assert "detected a Megatron-LM torch_dist checkpoint" in lines[-1]
    run_distributed(convert_rank, dims.world_size, plan)
    # Imported fully_reshardable: it loads at TP=1 DP=2 as it is.
    _assert_resumes_like_continuing(source, "dist_tp1_run", converted(plan), "parallel.tp=1",
                                    "parallel.dp=2")


def test_convert_mcore_to_hf_takes_a_megatron_lm_checkpoint(source, megatron_lm):
    out = source["tmp"] / "hf"
    proc = run_cli("convert", "mcore-to-hf", "--input", megatron_lm["legacy"], "--output", out,
                   "--dtype", "fp32", "--skip-validation")
    assert "detected a Megatron-LM legacy" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"],
            config["vocab_size"]) == (4, 128, 2, 4096)
    assert not list(out.parent.glob(".hf.megatron-lm*"))


# ---- bad input: a named error before anything is written ------------------------------------

def _damaged(megatron_lm: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(megatron_lm["legacy"], tmp_path / "legacy"))


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_missing_rank_shard_is_named_before_any_output(megatron_lm, tmp_path):
    ckpt = _damaged(megatron_lm, tmp_path)
    shutil.rmtree(ckpt / f"iter_{SAVED:07d}" / "mp_rank_01")
    out = tmp_path / "out"
    proc = run_cli("reshard", "--input", ckpt, "--output", out, "--tp", "1", check=False)
    assert proc.returncode == 1
    assert "(tp=2 pp=1) is incomplete" in proc.stderr
    assert f"{ckpt}/iter_{SAVED:07d}/mp_rank_01/model_optim_rng.pt is missing" in proc.stderr
    _assert_nothing_written(out)


def test_truncated_distrib_optim_is_named_before_any_output(megatron_lm, tmp_path):
    from flagscale.train.megatron_lm_import import reshard_megatron_lm

    ckpt = _damaged(megatron_lm, tmp_path)
    state = ckpt / f"iter_{SAVED:07d}" / "mp_rank_01" / "distrib_optim.pt"
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"{state} is truncated"):
        reshard_megatron_lm(ckpt, out, tp=1)
    _assert_nothing_written(out)


def test_model_outside_the_llama_family_is_refused_naming_its_args(megatron_lm, tmp_path):
    from flagscale.train.megatron_lm_import import megatron_lm_to_hf

    ckpt = _damaged(megatron_lm, tmp_path)
    for file in (ckpt / f"iter_{SAVED:07d}").glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(file, weights_only=False)
        state["args"].normalization, state["args"].swiglu = "LayerNorm", False
        state["args"].position_embedding_type = "learned_absolute"
        torch.save(state, file)
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError) as err:
        megatron_lm_to_hf(ckpt, out, dtype="fp32")
    assert ("normalization='LayerNorm' (needs 'RMSNorm'); swiglu=False (needs True); "
            "position_embedding_type='learned_absolute' (needs 'rope')") in str(err.value)
    _assert_nothing_written(out)


def test_truncated_torch_dist_shard_is_named_before_any_output(megatron_lm, tmp_path):
    from flagscale.train.megatron_lm_import import reshard_megatron_lm

    ckpt = Path(shutil.copytree(megatron_lm["torch_dist"], tmp_path / "dist"))
    shard = sorted((ckpt / f"iter_{SAVED:07d}").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"shard {shard} is truncated"):
        reshard_megatron_lm(ckpt, out, tp=1)
    _assert_nothing_written(out)


def test_optimizer_buffers_out_of_order_are_refused_naming_the_parameter(megatron_lm, tmp_path):
    # Same sizes, other order: what a run with another layer implementation or DDP bucketing
    # writes. Only the values can tell, and the conversion must not take them silently.
    from flagscale.train.megatron_lm_import import convert_rank, write_plan

    ckpt = _damaged(megatron_lm, tmp_path)
    for file in (ckpt / f"iter_{SAVED:07d}").glob("mp_rank_*/distrib_optim.pt"):
        state = torch.load(file)
        for key in ("param", "exp_avg", "exp_avg_sq"):
            buffers = state[0][(torch.float32, torch.float32)]
            buffers[key] = buffers[key].roll(64)
        torch.save(state, file)
    plan, dims = write_plan(ckpt, tmp_path / "work", log=lambda line: None)
    with pytest.raises(AssertionError, match="the master weights of .* in its flat buffers are "
                                             "not the weights model_optim_rng.pt holds"):
        run_distributed(convert_rank, dims.world_size, plan)
    assert not (tmp_path / "work" / "checkpoints").exists()

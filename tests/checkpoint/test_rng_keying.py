"""Per-rank RNG states in a checkpoint are keyed by (pp, tp, cp, dp) rank: at context parallelism
2 (megatron-core's process groups on 2 real gloo processes; the CP attention itself needs
Transformer Engine, which the RNG round trip does not) each rank saves its own state under its
own key and gets exactly that state back."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _save_and_restore(path: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from flagscale.checkpoint.state import _restore_rng, _rng_object
    from flagscale.config.parallel_dims import ParallelDims
    from flagscale.platform import setup_platform

    setup_platform("cpu")
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    try:
        rank = dist.get_rank()
        dims = ParallelDims(tp=1, pp=1, cp=2, dp=1)
        # Different states on the two CP ranks, as dropout under CP draws differently per rank.
        model_parallel_cuda_manual_seed(7 + rank)
        torch.manual_seed(100 + rank)
        cpu, tracker = torch.get_rng_state(), get_cuda_rng_tracker().get_states()
        saved = _rng_object(dims)
        dist_checkpointing.save({"rng_state": saved}, path)
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        loaded = dist_checkpointing.load({"rng_state": _rng_object(dims)}, path)
        _restore_rng(loaded["rng_state"])
        return {"key": saved.unique_key,
                "cpu_restored": torch.equal(torch.get_rng_state(), cpu),
                "tracker_restored": all(torch.equal(a, get_cuda_rng_tracker().get_states()[k])
                                        for k, a in tracker.items())}
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_each_context_parallel_rank_restores_its_own_rng_state(tmp_path):
    results = run_distributed(_save_and_restore, 2, str(tmp_path))
    # Offsets (pp, tp, cp, dp) in a (1, 1, 2, 1) grid: the CP rank is part of the key.
    assert [r["key"] for r in results] == ["rng_state/shard_0.0.0.0_1.1.2.1",
                                           "rng_state/shard_0.0.1.0_1.1.2.1"]
    assert all(r["cpu_restored"] and r["tracker_restored"] for r in results)

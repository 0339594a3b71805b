"""Context parallelism on 2 real gloo processes: each rank gets megatron-core's load-balanced
share of every sequence, and the per-sample losses a trace reports are the whole sequence's,
each rank's share added up by the step summary's all-reduce (the attention itself needs
Transformer Engine, absent on CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

SEQ, ROWS = 8, 3


def _full_batch():
    tokens = torch.arange(ROWS * SEQ).reshape(ROWS, SEQ)
    mask = torch.ones(ROWS, SEQ)
    mask[1, 5:] = 0  # a sample whose loss-bearing tokens are unevenly spread over the ranks
    return {"tokens": tokens, "labels": tokens + 1, "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(ROWS, SEQ).clone()}


def _per_token_loss():
    return torch.linspace(0.5, 3.0, ROWS * SEQ).reshape(ROWS, SEQ)


def _cp_rank_work():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from flagscale.data.datasets import to_device
    from flagscale.platform import setup_platform
    from flagscale.train.callbacks.spikes import mean_losses
    from flagscale.train.step_summary import StepSummary
    from flagscale.train.trainer import _loss, _sample_losses

    setup_platform("cpu")
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    try:
        batch = _full_batch()
        local = to_device(batch, torch.device("cpu"), cp=2)
        # The same split applied to the per-token losses the model would compute locally.
        losses = to_device({"loss": _per_token_loss()}, torch.device("cpu"), cp=2)["loss"]
        _, _, reduced = _loss(local["loss_mask"], losses)
        summary = StepSummary(torch.device("cpu"))
        summary.add("sample_losses", _sample_losses([reduced]))  # as the spike callback does
        samples = mean_losses(summary.reduce()["sample_losses"])
        return {k: v.tolist() for k, v in local.items()}, samples
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_batch_split_and_trace_losses_over_the_cp_group():
    from flagscale.train.trainer import _loss

    results = run_distributed(_cp_rank_work, 2)
    full = _full_batch()
    chunk = SEQ // 4
    for rank, (local, _) in enumerate(results):
        # Rank r keeps chunks r and 2*cp-1-r of the sequence split into 2*cp = 4 chunks.
        keep = [*range(rank * chunk, (rank + 1) * chunk),
                *range((3 - rank) * chunk, (4 - rank) * chunk)]
        for key, value in full.items():
            assert local[key] == value[:, keep].tolist(), (rank, key)
    _, _, whole = _loss(full["loss_mask"], _per_token_loss())
    expected = (whole["sample_losses"][0] / whole["sample_losses"][1]).tolist()
    for _, samples in results:
        assert samples == pytest.approx(expected, rel=1e-6)

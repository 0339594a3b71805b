"""Which global sample every row of every microbatch reads: fixed by the formula in
flagscale.data.datasets, independent of worker timing, and shifted exactly by skipped batches."""

from __future__ import annotations

import torch

from flagscale.config import load_config, validate
from flagscale.data.datasets import BatchSchedule, batch_index, build_datasets, microbatches


def test_skipped_iterations_retire_their_batch_and_shift_later_ones():
    cfg = load_config(overrides=["model.preset=tiny", "data.skip_iterations=[3, 5]"])
    assert [batch_index(cfg, it) for it in range(6)] == [0, 1, 3, 5, 6, 7]
    assert [batch_index(load_config(), it) for it in range(3)] == [0, 1, 2]


def test_microbatch_rows_read_the_documented_global_samples(tmp_path, tiny_corpus):
    cfg = load_config(overrides=["model.preset=tiny", f"data.paths=[{tiny_corpus}]",
                                 "train.micro_batch_size=2", "train.global_batch_size=8",
                                 "train.seq_length=32", "train.iterations=3"])
    layout = validate(cfg, world_size=2)  # dp = 2, two microbatches per rank
    dataset, _ = build_datasets(cfg, layout, eod=3, cache_dir=tmp_path / "cache")
    for dp_rank in range(2):
        for m, batch in enumerate(microbatches(dataset, cfg, layout, dp_rank, 2, torch.device("cpu"))):
            for row in range(2):
                g = BatchSchedule.for_training(cfg, 2).sample_index(2, m, dp_rank, row)
                assert g == 2 * 8 + m * 4 + dp_rank * 2 + row
                assert torch.equal(batch["tokens"][row], dataset[g]["tokens"])

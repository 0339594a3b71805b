"""Checkpoints that cannot load into a run are refused before any tensor is read; a vocabulary
padded to another size is not among them (megatron-core trims or zero-pads its rows)."""

from __future__ import annotations

import pytest

from flagscale.checkpoint.state import check_compatible, saved_vocab_rows
from flagscale.config import load_config, validate
from flagscale.errors import CheckpointError


def test_resume_at_a_tp_that_changes_the_vocabulary_padding_is_accepted():
    saved = {"flagscale": {"config": {"model": {"vocab_size": 128256,
                                                "make_vocab_size_divisible_by": 128},
                                      "parallel": {"tp": 1}}}}
    cfg = load_config(overrides=["model.preset=llama3_8b", "parallel.tp=8"])
    layout = validate(cfg, world_size=8, check_paths=False)
    check_compatible("ckpt", saved, cfg.model, layout)
    assert (saved_vocab_rows(saved), layout.padded_vocab_size) == (128256, 129024)


def test_another_architecture_is_refused_up_front():
    saved = {"flagscale": {"config": {"model": {"num_layers": 30}}}}
    cfg = load_config(overrides=["model.preset=llama3_8b"])
    with pytest.raises(CheckpointError, match="model.num_layers: checkpoint 30, this run 32"):
        check_compatible("ckpt", saved, cfg.model, validate(cfg, 1, check_paths=False))

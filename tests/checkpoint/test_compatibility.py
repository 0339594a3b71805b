"""Checkpoints that cannot load into a run are refused before any tensor is read."""

from __future__ import annotations

import pytest

from flagscale.checkpoint.state import check_compatible
from flagscale.config import load_config, validate
from flagscale.errors import CheckpointError


def test_resume_at_a_tp_that_changes_the_vocabulary_padding_is_refused_up_front():
    saved = {"flagscale": {"config": {"model": {"vocab_size": 128256,
                                                "make_vocab_size_divisible_by": 128},
                                      "parallel": {"tp": 1}}}}
    cfg = load_config(overrides=["model.preset=llama3_8b", "parallel.tp=8"])
    layout = validate(cfg, world_size=8, check_paths=False)
    with pytest.raises(CheckpointError, match=r"padded to 128256 rows .* pads to 129024"):
        check_compatible("ckpt", saved, cfg.model, layout)
    same = validate(load_config(overrides=["model.preset=llama3_8b", "parallel.tp=2"]), 2,
                    check_paths=False)
    check_compatible("ckpt", saved, cfg.model, same)  # 128256 is a multiple of 256 too

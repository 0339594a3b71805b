"""CheckpointMeta: what a checkpoint records about itself, read from any flagscale version."""

from __future__ import annotations

import pytest

from flagscale.checkpoint import CheckpointMeta
from flagscale.config import ParallelDims
from flagscale.errors import CheckpointError


def test_round_trips_and_records_the_layout_with_cp():
    meta = CheckpointMeta({"model": {"preset": "tiny"}}, ParallelDims(tp=2, pp=1, dp=1),
                          has_optimizer=False, source="/hf/tiny")
    data = meta.to_dict()
    assert data == {"format": 1, "config": {"model": {"preset": "tiny"}},
                    "layout": {"tp": 2, "pp": 1, "cp": 1, "dp": 1, "vpp": None},
                    "has_optimizer": False, "source": "/hf/tiny"}
    assert CheckpointMeta.from_dict(data) == meta


def test_reads_entries_written_before_cp_and_has_optimizer():
    # A common state as flagscale wrote it before this class: no cp, no has_optimizer.
    common = {"optimizer": {}, "flagscale": {"format": 1, "config": {"parallel": {"tp": 1}},
                                             "layout": {"tp": 1, "pp": 2, "dp": 2, "vpp": None}}}
    meta = CheckpointMeta.from_common(common)
    assert meta.dims == ParallelDims(tp=1, pp=2, dp=2) and meta.has_optimizer
    assert meta.config == {"parallel": {"tp": 1}}
    weights_only = CheckpointMeta.from_common({"flagscale": {"layout": None}})
    assert not weights_only.has_optimizer and weights_only.dims is None
    with pytest.raises(CheckpointError, match="ckpt records no flagscale layout"):
        weights_only.layout("ckpt")

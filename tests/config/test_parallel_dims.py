"""ParallelDims: the one value every product of parallel degrees comes from."""

from __future__ import annotations

import pytest
import torch

from flagscale.config import ParallelDims, load_config, transformer_engine_features, validate
from flagscale.errors import ConfigError, FlagScaleError
from flagscale.platform import require_transformer_engine


def test_derives_dp_from_the_world_and_multiplies_in_one_place():
    dims = ParallelDims.from_world(16, tp=2, pp=2, cp=2)
    assert dims.dp == 2
    assert (dims.model_parallel_size, dims.world_size) == (8, 16)
    assert ParallelDims(tp=2, pp=4, dp=1, vpp=2).stages == 8
    assert dims.describe() == "tp=2 pp=2 cp=2 dp=2"
    assert ParallelDims(tp=2, pp=1, dp=1).describe() == "tp=2 pp=1 dp=1"


def test_sizes_that_do_not_fit_the_world_show_the_arithmetic():
    with pytest.raises(ConfigError, match=r"^tp\(4\) \* pp\(2\) \* cp\(1\) \* dp\(\?\) != world "
                                          r"size \(6\)"):
        ParallelDims.from_world(6, tp=4, pp=2)
    with pytest.raises(ConfigError, match=r"tp\(2\) \* pp\(1\) \* cp\(1\) \* dp\(3\) = 6 != world "
                                          r"size \(4\)"):
        ParallelDims.from_world(4, tp=2, pp=1, dp=3)
    with pytest.raises(ConfigError, match="dp=0 must be an integer >= 1"):
        ParallelDims(tp=1, pp=1, dp=0)


def test_round_trips_through_a_dict_and_reads_layouts_recorded_before_cp():
    dims = ParallelDims(tp=2, pp=2, dp=1, vpp=2)
    assert dims.to_dict() == {"tp": 2, "pp": 2, "cp": 1, "dp": 1, "vpp": 2}
    assert ParallelDims.from_dict(dims.to_dict()) == dims
    assert ParallelDims.from_dict({"tp": 1, "pp": 2, "dp": 1, "vpp": None}) == \
        ParallelDims(tp=1, pp=2, dp=1)
    # One virtual stage is no interleaving: both spellings are the same layout.
    assert ParallelDims(tp=1, pp=2, dp=1, vpp=1) == ParallelDims(tp=1, pp=2, dp=1)


def test_layout_reads_its_degrees_from_dims():
    cfg = load_config(overrides=["model.preset=tiny", "parallel.tp=2"])
    layout = validate(cfg, world_size=4, check_paths=False)
    assert layout.dims == ParallelDims(tp=2, pp=1, dp=2)
    assert (layout.tp, layout.pp, layout.cp, layout.dp, layout.vpp, layout.world_size) == \
        (2, 1, 1, 2, None, 4)


def test_context_parallelism_is_checked_up_front():
    cfg = load_config(overrides=["model.preset=tiny", "parallel.cp=2", "train.seq_length=102"])
    with pytest.raises(ConfigError, match=r"train\.seq_length \(102\) % \(2 \* parallel\.cp "
                                          r"\(2\) \* parallel\.tp \(1\)\) = 2"):
        validate(cfg, world_size=2, check_paths=False)
    cfg = load_config(overrides=["model.preset=tiny", "parallel.cp=2"])
    assert validate(cfg, world_size=2, check_paths=False).cp == 2
    # The attention needs Transformer Engine: refused before launch where it is absent.
    if not torch.cuda.is_available():
        with pytest.raises(FlagScaleError, match=r"parallel\.cp=2 .*needs Transformer Engine"):
            require_transformer_engine(transformer_engine_features(cfg), cfg.platform)
    cfg = load_config(overrides=["model.preset=tiny", "parallel.cp=0"])
    with pytest.raises(ConfigError, match=r"parallel\.cp must be at least 1, got 0"):
        validate(cfg, world_size=2, check_paths=False)

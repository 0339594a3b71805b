"""Every check a training run can make before any process starts, in one function.

The CLI calls :func:`check_run` before it launches workers and each worker calls it again on start
(a torchrun launch skips the CLI's pass), so a run never fails late on something visible up front.
"""

from __future__ import annotations

from flagscale.config import Config, Layout, transformer_engine_features, validate
from flagscale.data.datasets import check_training_data
from flagscale.models import check_model
from flagscale.platform import require_transformer_engine


def check_run(cfg: Config, world_size: int) -> Layout:
    """Validate every config section for ``world_size`` processes, what the model family can
    express, the kernels the settings need (Transformer Engine for cp, fp8, tp_comm_overlap) and
    the training data; return the derived layout."""
    layout = validate(cfg, world_size)
    check_model(cfg.model)
    require_transformer_engine(transformer_engine_features(cfg), cfg.platform)
    check_training_data(cfg)
    return layout

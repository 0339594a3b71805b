"""Pieces both conversion directions share: dtypes, the flagscale config of a checkpoint at one
process, and a one-process megatron-core context."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

# Re-exported: convert/export.py imports it from here; it lives with the checkpoint code.
from flagscale.config import Config
from flagscale.errors import ConversionError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def single_process_layout(cfg: Config, padded_vocab_size: int, params_dtype: str = "fp32"):
    """``cfg`` at TP=PP=1 (no VPP, no sequence parallel) and its Layout, with the padded
    vocabulary of the checkpoint (which depends on the TP it was written for)."""
    from flagscale.config import validate

    one = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, params_dtype=params_dtype),
        parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, cp=1, vpp=None,
                                     sequence_parallel=False, dp=None),
        train=dataclasses.replace(cfg.train, micro_batch_size=1, global_batch_size=1,
                                  recompute="none"))
    layout = validate(one, world_size=1, check_paths=False)
    return one, dataclasses.replace(layout, padded_vocab_size=padded_vocab_size)


@contextlib.contextmanager
def single_process_megatron() -> Iterator[object]:
    """A one-process gloo group with megatron-core's parallel state at TP=PP=1; yields the
    Platform. Reuses an existing one-process group; tears down only what it created."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from flagscale.platform import setup_platform, world_of_one

    platform = setup_platform("auto")
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError("flagscale convert runs in a single process; it was started inside "
                              f"a {dist.get_world_size()}-process group. Run it without torchrun.")
    with world_of_one(platform):
        created_parallel = not parallel_state.model_parallel_is_initialized()
        if created_parallel:
            parallel_state.initialize_model_parallel(1, 1)
            # Module construction draws from megatron's model-parallel RNG (weights are replaced).
            model_parallel_cuda_manual_seed(0)
        try:
            yield platform
        finally:
            if created_parallel:
                parallel_state.destroy_model_parallel()

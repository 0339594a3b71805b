"""The CUDA backend: NCCL, one GPU per local rank, Transformer Engine and apex when importable."""

from __future__ import annotations

import importlib.util
import os

import torch


def optional_kernels() -> dict[str, bool]:
    """Which optional fused-kernel libraries can be imported (no import side effects)."""
    return {"transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
            "apex": importlib.util.find_spec("apex") is not None}


def install() -> torch.device:
    """Bind this process to its local GPU and return that device."""
    # Megatron's TP/SP communication overlap relies on a single hardware work queue.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)

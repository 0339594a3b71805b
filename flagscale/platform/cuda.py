"""The CUDA backend: NCCL, one GPU per local rank, Transformer Engine and apex when they really
import (:mod:`flagscale.platform.kernels`)."""

from __future__ import annotations

import os

import torch

from flagscale.platform.kernels import KernelStatus, probe_kernels


def optional_kernels() -> dict[str, KernelStatus]:
    """The status of each optional fused-kernel library (imported for real)."""
    return probe_kernels()


def install() -> torch.device:
    """Bind this process to its local GPU and return that device."""
    # Megatron's TP/SP communication overlap relies on a single hardware work queue.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)

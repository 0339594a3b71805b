"""The one place that knows what hardware flagscale runs on.

``setup_platform`` picks the backend (``cuda``: NCCL on GPUs; ``cpu``: gloo on CPU processes with
megatron-core's hard-wired CUDA calls redirected) and must run before megatron-core builds anything.
Project code takes its device from the returned :class:`Platform`, never from ``torch.cuda``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from flagscale.errors import ConfigError


@dataclass(frozen=True)
class Platform:
    """The active backend."""

    kind: str
    """``cuda`` or ``cpu``."""
    device: torch.device
    """Device of this process's tensors."""
    backend: str
    """torch.distributed backend (``nccl`` or ``gloo``)."""
    transformer_engine: bool
    """Transformer Engine layer spec in use."""
    apex: bool
    """apex fused kernels importable."""

    def describe(self) -> str:
        kernels = [n for n, on in (("transformer_engine", self.transformer_engine),
                                   ("apex", self.apex)) if on]
        return (f"platform {self.kind}: device {self.device}, backend {self.backend}, optional "
                f"kernels: {', '.join(kernels) or 'none (megatron-core local layer spec)'}")


_ACTIVE: Platform | None = None


def setup_platform(name: str = "auto") -> Platform:
    """Activate the ``auto``/``cuda``/``cpu`` backend for this process (idempotent)."""
    global _ACTIVE
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if _ACTIVE is not None:
        if _ACTIVE.kind != kind:
            raise ConfigError(f"platform {kind} requested but {_ACTIVE.kind} is already active "
                              f"in this process.")
        return _ACTIVE
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("platform=cuda but torch sees no GPU (torch.cuda.is_available() is "
                              "False). Use platform=cpu or auto, or check CUDA_VISIBLE_DEVICES.")
        from flagscale.platform import cuda
        device = cuda.install()
        kernels = cuda.optional_kernels()
        _ACTIVE = Platform("cuda", device, "nccl", kernels["transformer_engine"], kernels["apex"])
    elif kind == "cpu":
        if torch.cuda.is_available():
            raise ConfigError("platform=cpu on a machine with a visible GPU: flagscale refuses to "
                              "redirect CUDA calls there. Use platform=cuda (or auto), or hide "
                              "the GPUs with CUDA_VISIBLE_DEVICES=''.")
        from flagscale.platform import cpu
        cpu.install()
        _ACTIVE = Platform("cpu", torch.device("cpu"), "gloo", False, False)
    else:
        raise ConfigError(f"platform={name!r} is not one of auto, cuda, cpu.")
    return _ACTIVE


def active_platform() -> Platform:
    """The platform set up in this process (sets up ``auto`` when none was)."""
    return _ACTIVE or setup_platform("auto")


@contextlib.contextmanager
def world_of_one(platform: Platform | None = None):
    """A one-process torch.distributed group for single-process tools (conversion, tracing)
    that call into megatron-core code asking for ranks; reuses a group that already exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    platform = platform or active_platform()
    dist.init_process_group(platform.backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": platform.device} if platform.kind == "cuda" else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()

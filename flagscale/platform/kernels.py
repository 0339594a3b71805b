"""Which optional fused-kernel libraries really work in this process.

    statuses = probe_kernels()                 # {"transformer_engine": KernelStatus(...), ...}
    statuses["apex"].describe()                # 'apex: not installed'

Each library is imported for real, by the exact module megatron-core uses: a package that is
present but fails to import (a Transformer Engine built for another CUDA or torch, an apex built
without its CUDA extensions) counts as broken, with the import error as the reason, and is never
used. ``importlib.util.find_spec`` would call such an install available and crash later, deep
inside the model builder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

KERNEL_MODULES: dict[str, str] = {
    # megatron.core.extensions.transformer_engine imports transformer_engine.pytorch.
    "transformer_engine": "transformer_engine.pytorch",
    "apex": "apex",
    # The CUDA extension gradient_accumulation_fusion needs (megatron-core's tensor_parallel
    # layers import it by this name; apex builds it with --cuda_ext).
    "fused_wgrad": "fused_weight_gradient_mlp_cuda",
}
"""Kernel name -> the module whose import proves it usable."""


@dataclass(frozen=True)
class KernelStatus:
    """Whether one optional kernel library imports, and why not."""

    name: str
    module: str
    available: bool
    reason: str = ""
    """``not installed`` or ``broken: <the import error>``; empty when available."""

    def describe(self) -> str:
        return f"{self.name}: {'available' if self.available else self.reason}"


def probe_kernel(name: str) -> KernelStatus:
    """Import the module of kernel ``name`` (see :data:`KERNEL_MODULES`) and report."""
    module = KERNEL_MODULES[name]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Absent only when the missing module is the library itself; a missing dependency inside
        # an installed library is a broken install.
        top = module.split(".")[0]
        if exc.name in (top, module):
            return KernelStatus(name, module, False, "not installed")
        return KernelStatus(name, module, False, f"broken: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any import failure means the library is unusable
        return KernelStatus(name, module, False, f"broken: {type(exc).__name__}: {exc}")
    return KernelStatus(name, module, True)


def probe_kernels() -> dict[str, KernelStatus]:
    """Every optional kernel library's status."""
    return {name: probe_kernel(name) for name in KERNEL_MODULES}

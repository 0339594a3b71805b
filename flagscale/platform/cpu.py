"""Run megatron-core on CPU processes over gloo.

megatron-core 0.16.1 hard-wires CUDA in a handful of places (REFERENCE section 1): the current
device, streams, events and synchronisation; the CUDA RNG used by its RNG tracker; literal
``device='cuda'`` arguments; ``Tensor.type()`` string checks in the distributed optimizer and the
grad-norm clip; ``Tensor.cuda()``. :func:`install` redirects exactly those to the CPU. It refuses to
run when CUDA is available, so a GPU job can never pick it up by accident, and it is the only place
in flagscale that replaces ``torch.cuda`` functions.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


class _Event:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so events are instantaneous."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    """Stand-in for ``torch.cuda.Stream``: one in-order CPU queue."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.split(":")[0] == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Maps any ``device='cuda...'`` argument of a torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if args and func in (torch.Tensor.to,) and any(_is_cuda_device(a) for a in args[1:]):
            args = tuple(torch.device("cpu") if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


_original_type = torch.Tensor.type


def _type(self, dtype=None, non_blocking=False, **kwargs):
    # The distributed optimizer asserts param.type() == 'torch.cuda.FloatTensor'; report CPU
    # tensors under their CUDA names so those checks see the dtype they are really about.
    if dtype is None and not kwargs:
        name = _original_type(self)
        # Parameters re-dispatch through here twice; rename once.
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = dtype.replace("torch.cuda.", "torch.", 1)
    return _original_type(self, dtype, non_blocking, **kwargs)


def _get_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def install() -> None:
    """Redirect megatron-core's hard-wired CUDA calls to the CPU (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("flagscale.platform.cpu must not be installed on a machine with CUDA; "
                           "use platform: cuda.")
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.Event = _Event
    cuda.Stream = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.manual_seed = torch.manual_seed
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    torch.Tensor.type = _type
    torch.Tensor.cuda = lambda self, *a, **k: self

    # The RNG tracker's fork() swaps states through these two private helpers.
    from megatron.core.tensor_parallel import random as mcore_random
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)

    _CudaToCpu().__enter__()
    _quiet_expected_warnings()
    _INSTALLED = True


def _quiet_expected_warnings() -> None:
    # The CUDA RNG is the CPU RNG here, so the RNG tracker's "CPU state unchanged" check always
    # trips; on a GPU the same message would mean a real problem, so it is only muted here.
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())

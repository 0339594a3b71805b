"""Pieces both conversion directions share: dtypes, the flagscale config of a checkpoint at one
process, a one-process megatron-core context, one megatron-core transformer layer on its own, a
read-ahead thread, background writing, and tensors copied file to file (:class:`FileBytes`)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

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


def megatron_layer(cfg: Config, padded_vocab_size: int, params_dtype: str, platform):
    """One megatron-core transformer layer of ``cfg``'s family at TP=PP=1, uninitialised (its
    memory is not touched until written). Needs :func:`single_process_megatron`."""
    from megatron.core.transformer.spec_utils import build_module

    from flagscale.models import get_model_spec

    one, layout = single_process_layout(cfg, padded_vocab_size, params_dtype)
    spec = get_model_spec(cfg.model)
    tconfig = dataclasses.replace(spec.transformer_config(one, layout, platform),
                                  perform_initialization=False)
    layer_spec = spec.layer_spec(platform, tconfig, None)
    layer = build_module(getattr(layer_spec, "layer_specs", [layer_spec])[0], config=tconfig,
                         layer_number=1)
    return layer.to(platform.device)


def layer_sharded_state(layer, index: int, num_layers: int) -> dict:
    """``layer``'s sharded state as transformer layer ``index`` of ``num_layers``: its tensors
    and objects under their global checkpoint keys (``decoder.layers.*``, leading layer axis)."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    state = layer.sharded_state_dict(prefix="decoder.layers.0.",
                                     sharded_offsets=((0, index, num_layers),))
    replace_prefix_for_sharding(state, "decoder.layers.0.", "decoder.layers.")
    return state


def prefetched(groups: Iterable, depth: int = 2) -> Iterator:
    """Yield the items of ``groups`` while a background thread produces the next ones: reading
    overlaps the consumer's work (both release the GIL) and at most ``depth`` items are alive
    at once. An exception in the producer is re-raised in the consumer."""
    ready: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth)
    done = object()
    stop = threading.Event()
    iterator = iter(groups)

    def produce():
        try:
            while not stop.is_set():
                slots.acquire()
                item = next(iterator, done)
                ready.put(item)
                if item is done:
                    return
                del item
        except BaseException as exc:  # re-raised in the consumer, with its traceback
            ready.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="flagscale-convert-reader")
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()
    finally:
        stop.set()
        slots.release()
        thread.join()


class WriteQueue:
    """Background writing with bounded memory: ``submit(lane, nbytes, fn, *args)`` runs
    ``fn(*args)`` on lane ``lane``'s thread (a lane's jobs run in order; lanes run in parallel)
    while the caller produces the next data. The caller blocks while more than ``max_bytes`` of
    submitted data is unwritten (one job is always admitted, however large), so memory holds at
    most that much besides what the caller holds. A job's exception is re-raised in the caller by
    the next ``submit`` or by ``wait``. ``on_written(nbytes)`` is called after each job, one call
    at a time (progress bars)."""

    def __init__(self, lanes: int, max_bytes: int, name: str = "flagscale-write",
                 on_written: Callable[[int], object] = lambda nbytes: None):
        self.lanes = lanes
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{i}")
                       for i in range(lanes)]
        self._futures: list[Future] = []
        self._budget = threading.Condition()
        self._queued, self._max = 0, max_bytes
        self._on_written = on_written
        self.lane_bytes = [0] * lanes
        """Bytes submitted per lane (callers balance lanes with it)."""

    def submit(self, lane: int, nbytes: int, fn: Callable, *args) -> None:
        with self._budget:
            self._budget.wait_for(lambda: self._queued == 0
                                  or self._queued + nbytes <= self._max)
            self._queued += nbytes
        self.lane_bytes[lane] += nbytes
        self._futures.append(self._pools[lane].submit(self._run, nbytes, fn, *args))
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()  # re-raises a writer's error (e.g. disk full) here

    def _run(self, nbytes: int, fn: Callable, *args) -> None:
        try:
            fn(*args)
            with self._budget:
                self._on_written(nbytes)
        finally:
            with self._budget:
                self._queued -= nbytes
                self._budget.notify_all()

    def least_loaded(self) -> int:
        """The lane with the fewest bytes submitted."""
        return min(range(self.lanes), key=self.lane_bytes.__getitem__)

    def wait(self) -> None:
        """Wait for every submitted job; re-raise the first failure."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def close(self) -> None:
        """Stop: drop jobs not started (after an error nothing more is written) and wait for the
        running ones, without re-raising."""
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)


ZEROS = -1
"""The ``fd`` of a :class:`FileBytes` range that is zeros (vocabulary padding rows)."""
_COPY_CHUNK = 64 << 20


@dataclasses.dataclass(frozen=True)
class FileBytes:
    """A tensor whose bytes are the concatenation of byte ranges of open files (rows of a
    checkpoint's or a safetensors file's stored tensors): written by copying them file to file,
    it never enters the process's memory."""

    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int, int], ...]
    """``(fd, position, nbytes)`` in order; ``fd`` :data:`ZEROS`: ``nbytes`` zero bytes."""
    dtype: Optional[torch.dtype] = None
    """The dtype the bytes hold (None: the dtype of the file being written)."""

    @property
    def nbytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.ranges)

    def write(self, fd: int, position: int) -> None:
        """Write the bytes at ``position`` of ``fd``."""
        for source, start, nbytes in self.ranges:
            copy_range(source, start, nbytes, fd, position)
            position += nbytes


def pwrite_all(fd: int, data, position: int) -> None:
    """Write all of ``data`` at ``position`` of ``fd``."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)


def copy_range(source: int, start: int, nbytes: int, fd: int, position: int) -> None:
    """Copy ``nbytes`` at ``start`` of file ``source`` (:data:`ZEROS`: write zeros) to
    ``position`` of ``fd``: in the kernel (``copy_file_range``: no pass through this process's
    memory, as a plain file copy), or through a bounded buffer where the file systems do not
    support it."""
    done = 0
    while source != ZEROS and done < nbytes:
        try:
            n = os.copy_file_range(source, fd, min(nbytes - done, 1 << 30), start + done,
                                   position + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            break
        if n == 0:
            break  # end of file: reported below
        done += n
    while done < nbytes:
        size = min(nbytes - done, _COPY_CHUNK)
        data = bytes(size) if source == ZEROS else os.pread(source, size, start + done)
        if not data:
            raise ConversionError(f"Unexpected end of file copying {nbytes} bytes at offset "
                                  f"{start}: a checkpoint or safetensors file is truncated.")
        pwrite_all(fd, data, position + done)
        done += len(data)

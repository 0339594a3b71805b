"""Host syncs and collectives per training step: flagscale's loop against a plain megatron-core
loop, counted side by side on the same processes.

    python benchmarks/step_syncs.py [--iterations 12] [--nproc 2]

Runs the two loops of ``benchmarks/overhead.py`` (same tiny model, data and layout) with every
torch.distributed collective and every tensor-to-host read counted while they train. Counted as
collectives: each call of a ``torch.distributed`` collective or point-to-point function, also
where megatron-core bound one to a name of its own at import (its DDP's all-gather and
reduce-scatter functions), except calls on a group of one rank (megatron-core issues some on
its tensor- and pipeline-parallel groups whatever their size; they move nothing). Counted as
host syncs: ``Tensor.item``, ``tolist``, ``cpu``, ``numpy`` and ``float()``/``int()``/``bool()``
of a tensor, each of which waits for the device on a GPU (on this CPU run they cost nothing, but
the count is the same code path; torch's own Adam and megatron-core's RNG tracker read a few
scalars per parameter or layer on CPU, alike in both loops). A step runs from one step's end to
the next (flagscale: after the last ``post_step``, so callbacks and logging are in it); printed:
the counts of the median step, by function, with metrics logged every 10 iterations, and of the
step that writes a record (the 11th: iteration 10's record).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

# This script's folder (sys.path[0] when run as a script): the loops are overhead.py's.
from overhead import ROOT, WARMUP, _config, baseline_loop, flagscale_loop

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast",
               "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_gather_object",
               "broadcast_object_list")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class Counting:
    """While active, counts calls of :data:`COLLECTIVES` and :data:`HOST_READS` by name."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._undo: list = []
        self._active: list = []

    def __enter__(self) -> "Counting":
        originals = {id(getattr(dist, name)): name for name in COLLECTIVES if hasattr(dist, name)}
        # torch.distributed itself, and every name a megatron-core or flagscale module bound to
        # one of its functions at import.
        modules = [dist] + [m for n, m in list(sys.modules.items())
                            if m is not None and n.startswith(("megatron.", "flagscale."))]
        for module in modules:
            for attr, value in list(vars(module).items()):
                if id(value) in originals:
                    self._patch(module, attr, value, f"collective {originals[id(value)]}")
        for name in HOST_READS:
            self._patch(torch.Tensor, name, getattr(torch.Tensor, name), f"host sync {name}")
        return self

    def _patch(self, owner, attr: str, original, label: str) -> None:
        counts, active = self.counts, self._active
        signature = inspect.signature(original) if label.startswith("collective") else None

        def counted(*args, **kwargs):
            # Only the outermost call: a host read re-enters through the cpu platform's
            # TorchFunctionMode, and an object collective runs tensor collectives inside.
            if active:
                return original(*args, **kwargs)
            active.append(label)
            try:
                if signature is None or _group_size(signature, args, kwargs) > 1:
                    counts[label] += 1
                return original(*args, **kwargs)
            finally:
                active.pop()

        setattr(owner, attr, counted)
        self._undo.append((owner, attr, original))

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()

    def snapshot(self) -> collections.Counter:
        return collections.Counter(self.counts)


def _group_size(signature, args, kwargs) -> int:
    """Ranks in the process group a collective call runs on (its ``group`` argument, else the
    world; a point-to-point call counts as two)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    if "group" not in signature.parameters:
        return 2
    group = bound.get("group")
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def step_counts(loop, cfg) -> list[collections.Counter]:
    """What each step of ``loop`` (after the first ``WARMUP``) called."""
    with Counting() as counting:
        marks: list[collections.Counter] = []
        loop(cfg, lambda: marks.append(counting.snapshot()))
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return steps[len(steps) - cfg.train.iterations + WARMUP:]


def _totals(step: collections.Counter) -> tuple[int, int]:
    return (sum(v for k, v in step.items() if k.startswith("collective")),
            sum(v for k, v in step.items() if k.startswith("host sync")))


def _median_step(steps: list[collections.Counter]) -> collections.Counter:
    """The step whose (collectives, host syncs) total is the median one."""
    ordered = sorted(steps, key=_totals)
    return ordered[len(ordered) // 2]


def _describe(step: collections.Counter) -> str:
    collectives, syncs = _totals(step)
    parts = ", ".join(f"{k.split(' ', 1)[1] if k.startswith('collective') else k.split(' ')[-1]}"
                      f" x{v}" for k, v in sorted(step.items()) if v)
    return f"{collectives} collectives, {syncs} host syncs ({parts})"


def worker(iterations: int) -> None:
    from flagscale.platform import setup_platform
    from flagscale.train.setup import init_process_group

    init_process_group(setup_platform("auto"))
    with tempfile.TemporaryDirectory() as scratch:
        shared = os.environ.get("FS_BENCH_DIR", scratch)
        cfg = _config(shared, iterations, log_interval=10)
        base = step_counts(baseline_loop, cfg)
        fs = step_counts(flagscale_loop, cfg)
        if dist.get_rank() == 0:
            # flagscale's steps after the warm-up, 1-based. The record of iteration 10 is
            # written after that step's post_step, so it falls in the step of iteration 11.
            log_steps = [s for i, s in enumerate(fs, start=WARMUP + 1) if i % 10 == 1]
            print(f"\ntiny model, {dist.get_world_size()} processes, layout of "
                  f"examples/tiny/config.yaml, per step (median of {len(fs)}):")
            print(f"  megatron-core loop:            {_describe(_median_step(base))}")
            print(f"  flagscale loop:                {_describe(_median_step(fs))}")
            if log_steps:
                print(f"  flagscale loop, a log step:    {_describe(log_steps[0])}")
            sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if args.iterations <= WARMUP + 1:
        parser.error(f"--iterations must exceed {WARMUP + 1} (the first {WARMUP} are warm-up)")
    if "RANK" in os.environ:
        worker(args.iterations)
        return 0
    with tempfile.TemporaryDirectory() as shared:
        env = {**os.environ, "FS_BENCH_DIR": shared, "OMP_NUM_THREADS": "1"}
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={args.nproc}", __file__,
                                f"--iterations={args.iterations}"], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())

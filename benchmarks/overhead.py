"""flagscale's step time against a minimal loop written directly against megatron-core.

    python benchmarks/overhead.py [--iterations 40] [--nproc 2]

Both loops train the same tiny model (examples/tiny/config.yaml, same weights, same global
samples read from the same indexed dataset) on the same processes, alternating
baseline / flagscale twice, in one run. A flagscale step is timed from one ``post_step`` to the
next, so it includes everything the loop does per iteration (callbacks, console and
metrics.jsonl logging); the baseline step is zero-grad, forward/backward, optimizer step and
one loss all-reduce. Printed: median step times and their ratio (goal: at most 1.03), with
metrics logged every iteration and every 10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 5


def _config(run_dir: str, iterations: int, log_interval: int):
    from flagscale.config import load_config
    from flagscale.data import default_corpus_path, default_tokenizer_path, load_tokenizer, preprocess

    prefix = Path(run_dir) / "corpus"
    if not Path(str(prefix) + ".idx").exists() and int(os.environ["RANK"]) == 0:
        preprocess([default_corpus_path()], str(prefix), load_tokenizer(default_tokenizer_path()))
    import torch.distributed as dist

    dist.barrier()
    world = int(os.environ["WORLD_SIZE"])
    return load_config(ROOT / "examples/tiny/config.yaml", [
        f"data.paths=[{prefix}]", f"run.dir={run_dir}/run", f"train.iterations={iterations}",
        f"train.log_interval={log_interval}", "checkpoint.save_interval=0",
        "checkpoint.load=null", f"parallel.dp={world}"])


def baseline_step_times(cfg) -> list[float]:
    """Plain megatron-core: DDP, distributed optimizer, schedule; nothing else."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flagscale.config import validate
    from flagscale.data.datasets import build_datasets, microbatches
    from flagscale.models import build_model
    from flagscale.platform import setup_platform
    from flagscale.train.setup import init_model_parallel

    platform = setup_platform(cfg.platform)
    layout = validate(cfg, dist.get_world_size())
    init_model_parallel(cfg, layout)
    chunk = build_model(cfg, layout, platform)[0]
    model = DistributedDataParallel(chunk.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True), chunk)
    t = cfg.train
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, clip_grad=t.clip_grad, use_distributed_optimizer=True), [model])
    chunk.config.grad_scale_func = optimizer.scale_loss
    chunk.config.finalize_model_grads_func = finalize_model_grads
    dataset, _ = build_datasets(cfg, layout, eod=0, cache_dir=Path(cfg.run.dir) / "cache")
    run = get_forward_backward_func()
    dp_rank = parallel_state.get_data_parallel_rank()

    def step_fn(batches, module):
        b = next(batches)
        out = module(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss(o):
            mask = b["loss_mask"].float()
            total = (o.float() * mask).sum()
            return total, mask.sum().to(torch.int), {"loss": total.detach()}
        return out, loss

    times = []
    for it in range(t.iterations):
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = run(forward_step_func=step_fn,
                  data_iterator=microbatches(dataset, cfg, layout, dp_rank, it, platform.device),
                  model=[model], num_microbatches=layout.num_microbatches,
                  seq_length=t.seq_length, micro_batch_size=t.micro_batch_size)
        optimizer.step()
        loss = torch.stack([o["loss"] for o in out]).sum()
        dist.all_reduce(loss)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def flagscale_step_times(cfg) -> list[float]:
    """flagscale's loop with its callbacks; one step = one post_step to the next."""
    from flagscale.train.callbacks import Callback
    from flagscale.train.trainer import Trainer

    stamps: list[float] = []

    class Stamp(Callback):
        priority = -1000  # after every other post_step, so a step holds all of their work

        def post_step(self, step):
            stamps.append(time.perf_counter())

    Trainer(cfg, callbacks=[Stamp()]).fit()
    return [b - a for a, b in zip(stamps, stamps[1:])][WARMUP - 1:]


def worker(iterations: int) -> None:
    import torch.distributed as dist

    from flagscale.platform import setup_platform
    from flagscale.train.setup import init_process_group

    init_process_group(setup_platform("auto"))
    rank = dist.get_rank()
    with tempfile.TemporaryDirectory() as scratch:
        shared = os.environ.get("FS_BENCH_DIR", scratch)
        results = {}
        for log_interval in (10, 1):
            cfg = _config(shared, iterations, log_interval)
            base, fs = [], []
            for _ in range(2):
                base += baseline_step_times(cfg)
                fs += flagscale_step_times(cfg)
            results[log_interval] = (statistics.median(base), statistics.median(fs))
        if rank == 0:
            world = dist.get_world_size()
            print(f"\ntiny model, {world} processes, {iterations} iterations x2 per loop "
                  f"(first {WARMUP} dropped), median step time:")
            for log_interval, (base, fs) in results.items():
                print(f"  metrics every {log_interval:>2} it: megatron-core loop {base * 1e3:7.1f} ms"
                      f" | flagscale {fs * 1e3:7.1f} ms | ratio {fs / base:.3f} (goal <= 1.03)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args.iterations)
        return 0
    import subprocess

    with tempfile.TemporaryDirectory() as shared:
        env = {**os.environ, "FS_BENCH_DIR": shared, "OMP_NUM_THREADS": "1"}
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={args.nproc}", __file__,
                                f"--iterations={args.iterations}"], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())

"""flagscale's step time against a minimal loop written directly against megatron-core.

    python benchmarks/overhead.py [--iterations 60] [--rounds 5] [--nproc 2]

Both loops train the same tiny model (examples/tiny/config.yaml, same weights, same global
samples read from the same indexed dataset) on the same processes, in ``--rounds`` alternating
rounds (baseline, then flagscale) of ``--iterations`` steps each, in one run. A flagscale step
is timed from one ``post_step`` to the next, so it includes everything the loop does per
iteration (callbacks, the step summary, console and metrics.jsonl logging); the baseline step is
zero-grad, forward/backward, optimizer step and one loss all-reduce. Each round gives a ratio of
median step times; printed: the median of those ratios (goal: at most 1.03) and their spread
(lowest to highest), with metrics logged every iteration and every 10. A shared machine shows up
as a wide spread: compare medians only when the spread is narrow.

``benchmarks/step_syncs.py`` counts the host syncs and collectives of the same two loops.
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
    from flagscale.data import (default_corpus_path, default_tokenizer_path, load_tokenizer,
                                preprocess)

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


def baseline_loop(cfg, mark) -> None:
    """Plain megatron-core: DDP, distributed optimizer, schedule; nothing else. Calls ``mark()``
    before the first step and after every step."""
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

    mark()
    for it in range(t.iterations):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = run(forward_step_func=step_fn,
                  data_iterator=microbatches(dataset, cfg, layout, dp_rank, it, platform.device),
                  model=[model], num_microbatches=layout.num_microbatches,
                  seq_length=t.seq_length, micro_batch_size=t.micro_batch_size)
        optimizer.step()
        loss = torch.stack([o["loss"] for o in out]).sum()
        dist.all_reduce(loss)
        mark()


def flagscale_loop(cfg, mark) -> None:
    """flagscale's loop with its callbacks; calls ``mark()`` after every step's last
    ``post_step``, so a step (one mark to the next) holds all of their work."""
    from flagscale.train.callbacks import Callback
    from flagscale.train.trainer import Trainer

    class Mark(Callback):
        priority = -1001  # after every other post_step, the stop callback's (-1000) included

        def post_step(self, step):
            mark()

    Trainer(cfg, callbacks=[Mark()]).fit()


def step_times(loop, cfg) -> list[float]:
    """Wall time of each step of ``loop`` after the first ``WARMUP``."""
    stamps: list[float] = []
    loop(cfg, lambda: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    # flagscale's first mark comes after its first step.
    return times[len(times) - cfg.train.iterations + WARMUP:]


def worker(iterations: int, rounds: int) -> None:
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
            rows = []
            for _ in range(rounds):
                base = statistics.median(step_times(baseline_loop, cfg))
                fs = statistics.median(step_times(flagscale_loop, cfg))
                rows.append((base, fs, fs / base))
            results[log_interval] = rows
        if rank == 0:
            world = dist.get_world_size()
            print(f"\ntiny model, {world} processes, {rounds} alternating rounds of {iterations} "
                  f"iterations per loop (first {WARMUP} dropped); per round the ratio of median "
                  f"step times:")
            for log_interval, rows in results.items():
                base, fs, ratios = zip(*rows)
                print(f"  metrics every {log_interval:>2} it: megatron-core loop "
                      f"{statistics.median(base) * 1e3:7.1f} ms | flagscale "
                      f"{statistics.median(fs) * 1e3:7.1f} ms | ratio median "
                      f"{statistics.median(ratios):.3f} (goal <= 1.03), spread "
                      f"{min(ratios):.3f}..{max(ratios):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if args.iterations <= WARMUP + 1 or args.rounds < 1:
        parser.error(f"--iterations must exceed {WARMUP + 1} (the first {WARMUP} are warm-up) "
                     f"and --rounds must be at least 1")
    if "RANK" in os.environ:
        worker(args.iterations, args.rounds)
        return 0
    import subprocess

    with tempfile.TemporaryDirectory() as shared:
        env = {**os.environ, "FS_BENCH_DIR": shared, "OMP_NUM_THREADS": "1"}
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={args.nproc}", __file__,
                                f"--iterations={args.iterations}",
                                f"--rounds={args.rounds}"], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())

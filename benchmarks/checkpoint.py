"""Extra peak memory of a checkpoint save and load per rank, against the rank's own optimizer
shard, and the time of an async save against a sync one.

    python benchmarks/checkpoint.py [--nproc 2] [--hidden 512] [--layers 8]

Every measurement is a fresh set of ``--nproc`` worker processes training the same model (the
tiny preset widened by --hidden/--layers, ~28M parameters by default, fp32, dp = nproc) for two
steps, doing one thing, then one more step; a worker's peak RSS (``ru_maxrss``) is compared with
that of the same run doing nothing in between. Printed per rank: the extra peak of a sync save,
an async save (``checkpoint.async_save``) and a load, each divided by the rank's own optimizer
shard (fp32 master weights + both Adam moments it owns; goal: save <= 1.25 at dp=2, lower as dp
grows), and save times (async: until training may go on, and until the checkpoint is complete).
CPU processes on this machine; on GPUs the peak that matters is device memory, which a save no
longer gathers into either.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("none", "save", "async_save", "load")


def _config(shared: Path, phase: str, hidden: int, layers: int, world: int):
    import torch.distributed as dist

    from flagscale.config import load_config
    from flagscale.data import (default_corpus_path, default_tokenizer_path, load_tokenizer,
                                preprocess)

    prefix = shared / "corpus"
    if not Path(f"{prefix}.idx").exists() and dist.get_rank() == 0:
        preprocess([default_corpus_path()], str(prefix), load_tokenizer(default_tokenizer_path()),
                   workers=1, progress=False)
    dist.barrier()
    return load_config(ROOT / "examples/tiny/config.yaml", [
        f"data.paths=[{prefix}]", f"run.dir={shared}/run_{phase}", "train.iterations=3",
        "train.log_interval=100", "checkpoint.save_interval=0", "checkpoint.load=null",
        f"parallel.dp={world}", "parallel.tp=1", "parallel.pp=1", "model.params_dtype=fp32",
        f"model.hidden_size={hidden}", f"model.num_layers={layers}",
        f"model.ffn_hidden_size={hidden * 11 // 4}", "trace.enabled=false",
        "train.eval_interval=0"])


def _optimizer_shard_bytes(optimizer) -> int:
    """fp32 master weights and Adam moments this rank's distributed optimizer owns."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                total += param.numel() * param.element_size()
                total += sum(t.numel() * t.element_size()
                             for t in inner.optimizer.state[param].values()
                             if hasattr(t, "dim") and t.dim() > 0)
    return total


def worker(phase: str, hidden: int, layers: int) -> None:
    import torch.distributed as dist

    from flagscale.checkpoint import load_checkpoint
    from flagscale.platform import setup_platform
    from flagscale.train.setup import init_process_group
    from flagscale.train.trainer import Trainer

    init_process_group(setup_platform("auto"))
    shared = Path(os.environ["FS_BENCH_DIR"])
    # Each phase is a run of its own (one run per directory; the load phase reads the save's).
    cfg = _config(shared, phase, hidden, layers, dist.get_world_size())
    trainer = Trainer(cfg)
    for _ in range(2):
        trainer.train_step()
    seconds = {}
    start = time.perf_counter()
    if phase == "save":
        path = trainer.save_checkpoint()
        seconds["sync"] = time.perf_counter() - start
        (shared / "saved.txt").write_text(str(path))
    elif phase == "async_save":
        trainer.save_checkpoint(background=True)
        seconds["async_return"] = time.perf_counter() - start
        trainer.finish_saves(blocking=True)
        seconds["async_complete"] = time.perf_counter() - start
    elif phase == "load":
        load_checkpoint(Path((shared / "saved.txt").read_text()), trainer.model,
                        trainer.optimizer, trainer.scheduler, cfg.model, trainer.layout)
        seconds["load"] = time.perf_counter() - start
    trainer.train_step()
    result = {"rank": dist.get_rank(), "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
              * 1024, "shard": _optimizer_shard_bytes(trainer.optimizer), "seconds": seconds,
              "params": sum(p.numel() for chunk in trainer.model for p in chunk.parameters())}
    (shared / f"{phase}.{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()


def _launch(phase: str, args, shared: str) -> None:
    env = {**os.environ, "FS_BENCH_DIR": shared, "OMP_NUM_THREADS": "1"}
    code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={args.nproc}", __file__, f"--phase={phase}",
                            f"--hidden={args.hidden}", f"--layers={args.layers}"],
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    if code != 0:
        raise SystemExit(f"benchmark phase {phase} failed (exit code {code})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args.phase, args.hidden, args.layers)
        return 0
    with tempfile.TemporaryDirectory() as shared:
        for phase in PHASES:
            _launch(phase, args, shared)
        runs = {phase: [json.loads((Path(shared) / f"{phase}.{r}.json").read_text())
                        for r in range(args.nproc)] for phase in PHASES}
    mib = 2 ** 20
    params = runs["none"][0]["params"]
    print(f"model: {params / 1e6:.1f}M parameters per rank, fp32, dp={args.nproc}; extra peak "
          f"RSS over the same run without the operation, / the rank's own optimizer shard:")
    for rank in range(args.nproc):
        base, shard = runs["none"][rank]["maxrss"], runs["none"][rank]["shard"]
        ratios = {p: (runs[p][rank]["maxrss"] - base) / shard for p in PHASES[1:]}
        print(f"  rank {rank}: shard {shard / mib:.0f} MiB | save {ratios['save']:.2f} "
              f"(goal <= 1.25) | async save {ratios['async_save']:.2f} | load "
              f"{ratios['load']:.2f}")
    secs = {k: max(r["seconds"][k] for p in PHASES for r in runs[p] if k in r["seconds"])
            for k in ("sync", "async_return", "async_complete", "load")}
    print(f"save time: sync {secs['sync']:.2f}s | async {secs['async_return']:.2f}s until "
          f"training goes on, {secs['async_complete']:.2f}s until complete | load "
          f"{secs['load']:.2f}s")
    return 0


# torch_dist's writer starts a spawn-based multiprocessing Manager, which re-imports this file.
if __name__ == "__main__":
    sys.exit(main())

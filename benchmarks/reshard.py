"""Peak memory and time of ``flagscale reshard`` (offline, one process) on a training checkpoint,
against the largest parameter and against a plain copy of the checkpoint's bytes.

    python benchmarks/reshard.py [--hidden 2048] [--layers 22] [--tp 2] [--rounds 3]

The source is a real training checkpoint, not a synthetic one: the tiny preset widened to
--hidden/--layers (defaults: ~1.04B parameters, fp32, 16 heads in 4 query groups) trains one
step at tp=--tp on --tp CPU processes and saves what training saves (``dp_reshardable``: each
rank's flat DDP-bucket buffers, with the parameter index maps). fp32 Adam needs 16 bytes per
parameter, and the save more: the default size does not train in 24 GiB (``--layers 16``, 0.74B,
does); run a small size (``--hidden 256 --layers 4``) to check the script.

Then --rounds rounds alternate, each in a fresh process: ``reshard`` of the source to tp=1 (the
TP shards of every parameter reassembled), and ``shutil.copytree`` of the source. Printed: the
median times and their ratio (goal <= 3; the reshard's time excludes importing megatron-core,
a start-up cost like Python's own), and the reshard's peak RSS over its RSS just before
it started, divided by the largest parameter's fp32 size (goal: a few).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _train(work: Path, args) -> Path:
    from flagscale.data import default_corpus_path, default_tokenizer_path, load_tokenizer, preprocess

    prefix = work / "corpus"
    preprocess([default_corpus_path()], str(prefix), load_tokenizer(default_tokenizer_path()),
               workers=1, progress=False)
    run = work / "run"
    subprocess.run([sys.executable, "-m", "flagscale", "train", "examples/tiny/config.yaml",
                    "--nproc", str(args.tp), f"parallel.tp={args.tp}", "parallel.dp=1",
                    f"data.paths=[{prefix}]", f"run.dir={run}", "train.iterations=1",
                    "train.micro_batch_size=1", "train.global_batch_size=1",
                    "train.seq_length=64", "train.eval_interval=0", "train.log_interval=1",
                    "checkpoint.save_interval=1", "checkpoint.load=null",
                    "model.params_dtype=fp32", f"model.hidden_size={args.hidden}",
                    f"model.num_layers={args.layers}",
                    f"model.ffn_hidden_size={args.hidden * 11 // 4}",
                    f"model.num_attention_heads={args.heads}", "model.num_query_groups=4",
                    "trace.enabled=false"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run / "checkpoints" / "iter_0000001"


def _child_reshard(source: str, output: str) -> None:
    """One round's reshard, in a fresh process: peak RSS over the RSS before it, and time."""
    import megatron.core.dist_checkpointing  # noqa: F401  start-up cost, as Python's own
    from flagscale.train.reshard import reshard

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    reshard(source, output, tp=1, dp=1, progress=False, log=lambda line: None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "extra_rss": peak - before}))


def _child_copy(source: str, output: str) -> None:
    start = time.perf_counter()
    shutil.copytree(source, output)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def _round(kind: str, source: Path, output: Path) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, f"--child={kind}", str(source), str(output)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} round failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(output, ignore_errors=True)
    return result


def _largest_param_bytes(source: Path) -> tuple[int, int, str]:
    """(fp32 bytes of the largest parameter, total parameters, its name), from the index maps."""
    from flagscale.checkpoint import CheckpointMeta, read_run_state

    maps = CheckpointMeta.from_common(read_run_state(source)).param_index_maps
    sizes = {}
    for entry in maps:
        for bucket in entry["buckets"]:
            for p in bucket["params"]:
                numel = 1
                for n in p["shape"]:
                    numel *= n
                sizes[p["name"]] = numel
    name = max(sizes, key=sizes.get)
    return sizes[name] * 4, sum(sizes.values()), name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=None, help="directory to work in (default: a temporary "
                                                     "one beside the system's temp files)")
    parser.add_argument("--source", default=None, help="an existing dp_reshardable training "
                                                       "checkpoint to use instead of training one")
    parser.add_argument("--child", choices=("reshard", "copy"), help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        {"reshard": _child_reshard, "copy": _child_copy}[args.child](*rest)
        return 0
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        source = Path(args.source) if args.source else _train(work, args)
        largest, params, name = _largest_param_bytes(source)
        size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        times = {"reshard": [], "copy": []}
        extra = []
        for _ in range(args.rounds):
            for kind in ("reshard", "copy"):
                result = _round(kind, source, work / f"out_{kind}")
                times[kind].append(result["seconds"])
                if kind == "reshard":
                    extra.append(result["extra_rss"])
    gib = 2 ** 30
    reshard_s, copy_s = statistics.median(times["reshard"]), statistics.median(times["copy"])
    print(f"source: {params / 1e9:.2f}B parameters, tp={args.tp} dp_reshardable, "
          f"{size / gib:.2f} GiB; largest parameter {name}: {largest / gib:.3f} GiB fp32")
    print(f"reshard to tp=1: peak RSS over baseline {max(extra) / gib:.2f} GiB = "
          f"{max(extra) / largest:.2f} x the largest parameter's fp32 size")
    print(f"time: reshard {reshard_s:.2f}s, copytree {copy_s:.2f}s (medians of {args.rounds} "
          f"alternating rounds): {reshard_s / copy_s:.2f} x a plain copy (goal <= 3)")
    return 0


# torch_dist's writer starts a spawn-based multiprocessing Manager, which re-imports this file.
if __name__ == "__main__":
    sys.exit(main())

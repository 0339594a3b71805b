"""Export throughput and peak memory of ``flagscale convert mcore-to-hf`` on a ~1.1B model.

    python benchmarks/convert.py [--workdir /tmp] [--keep] [--rounds 3]

Writes a synthetic torch_dist checkpoint of TinyLlama-1.1B's shape (22 layers, hidden 2048, GQA
32/4, ffn 5632, vocab 32000; bf16, per-layer shards as megatron-core saves them) in a child
process, then in this process times, alternately for ``--rounds`` rounds, (1) a plain copy of the
checkpoint's files and (2) the export to bf16 safetensors (validation skipped: it would build two
fp32 copies of the model), sampling this process's resident memory. Medians are compared: on a
shared disk a single pair of timings swings by 2x. Goals: export time <= 2x the copy; peak memory growth about one
layer, not the model. Everything is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


SHAPE = dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
             ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=2048,
             rope_theta=10000.0, params_dtype="bf16")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENIZER = REPO / "flagscale" / "data" / "corpus" / "tokenizer.model"


def write_checkpoint(path: str) -> None:
    """Child process: save random bf16 weights as a megatron-core torch_dist checkpoint."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from flagscale.config import Config, ModelConfig, config_to_dict
    from flagscale.convert import mapping as M
    from flagscale.convert.common import single_process_megatron

    Path(path).mkdir(parents=True)
    cfg = Config(model=ModelConfig(**SHAPE))
    cfg.data.tokenizer = str(TOKENIZER)
    wm = M.WeightMap.of(cfg.model)
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return torch.randn(*dims, generator=gen).to(torch.bfloat16)

    layers = wm.dims.num_layers
    model = {e.mcore: ShardedTensor.from_rank_offsets(e.mcore, rand(*e.mcore_shape(wm.dims)),
                                                      replica_id=0) for e in wm.head + wm.tail}
    for layer in range(layers):
        for e in wm.layer:
            model[f"{e.mcore}.{layer}"] = ShardedTensor.from_rank_offsets(
                e.mcore, rand(*e.mcore_shape(wm.dims)), (0, layer, layers), replica_id=0,
                prepend_axis_num=1)
    with single_process_megatron():
        dist_checkpointing.save({"model": model, "flagscale": {
            "config": config_to_dict(cfg), "has_optimizer": False}}, path)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class RssSampler:
    """Peak resident set size of this process, sampled every 10 ms."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> int:
    """Run the benchmark and print one summary block."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the files for inspection")
    parser.add_argument("--rounds", type=int, default=3, help="copy/export pairs to time")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flagscale-bench-convert-", dir=args.workdir))
    try:
        import psutil

        from flagscale.config import ModelConfig
        from flagscale.convert import mapping as M, mcore_to_hf
        from flagscale.convert.export import checkpoint_config

        ckpt = work / "ckpt"
        t0 = time.perf_counter()
        child = mp.get_context("spawn").Process(target=write_checkpoint, args=(str(ckpt),))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"writing the synthetic checkpoint failed (exit {child.exitcode})")
            return 1
        ckpt_bytes = _dir_bytes(ckpt)
        print(f"synthetic checkpoint: {ckpt_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s")

        wm = M.WeightMap.of(ModelConfig(**SHAPE))
        layer_bytes = 2 * sum(math.prod(e.mcore_shape(wm.dims)) for e in wm.layer)
        vocab_bytes = 2 * SHAPE["vocab_size"] * SHAPE["hidden_size"]
        checkpoint_config(ckpt)  # import megatron-core before the baseline memory is taken
        rss_before = psutil.Process().memory_info().rss
        copies, exports = [], []
        with RssSampler() as rss:
            for _ in range(args.rounds):
                # Each timing starts with no dirty pages and ends once its bytes are on disk:
                # otherwise whichever runs second pays for the first one's writeback.
                os.sync()
                t0 = time.perf_counter()
                shutil.copytree(ckpt, work / "copy")
                os.sync()
                copies.append(time.perf_counter() - t0)
                shutil.rmtree(work / "copy")
                os.sync()
                t0 = time.perf_counter()
                result = mcore_to_hf(ckpt, work / "hf", dtype="bf16", validate=False,
                                     log=lambda *_: None)
                os.sync()
                exports.append(time.perf_counter() - t0)
                shutil.rmtree(work / "hf")
        copy_s, export_s = statistics.median(copies), statistics.median(exports)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        growth = rss.peak - rss_before
        print(f"model: {result.params / 1e9:.3f}B params, export wrote "
              f"{result.bytes_written / 1e9:.2f} GB "
              f"(checkpoint {ckpt_bytes / 1e9:.2f} GB)")
        print(f"time (each to durable disk, sync included; median of {args.rounds} alternating "
              f"rounds): export {export_s:.2f}s vs plain copy {copy_s:.2f}s -> "
              f"{export_s / copy_s:.2f}x (goal <= 2x); rounds: export "
              f"{', '.join(f'{t:.2f}' for t in exports)}s, copy "
              f"{', '.join(f'{t:.2f}' for t in copies)}s")
        print(f"memory: peak RSS {rss.peak / 1e9:.2f} GB (ru_maxrss {maxrss / 1e9:.2f} GB), growth "
              f"during export {growth / 1e9:.3f} GB; largest layer {layer_bytes / 1e9:.3f} GB, "
              f"embedding {vocab_bytes / 1e9:.3f} GB, model {result.bytes_written / 1e9:.2f} GB "
              f"-> growth = {growth / max(layer_bytes, vocab_bytes):.2f}x the largest tensor group")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Time and peak memory of ``flagscale convert`` in both directions and of each validation.

    python benchmarks/convert.py [--size 1b|small] [--depths 11,22] [--rounds 3] [--workdir /tmp]

For each depth (same width: the memory goal must not depend on the number of layers) a random bf16
Hugging Face Llama of TinyLlama-1.1B's width (hidden 2048, GQA 32/4, ffn 5632, vocab 32000; 22
layers = 1.1B parameters) is written in a child process. Then, alternately for ``--rounds``
rounds, this process times a plain copy of the HF files, the import (``hf_to_mcore``, validation
skipped), a plain copy of the checkpoint and the export (``mcore_to_hf`` to bf16, validation
skipped), each ending once its bytes are on disk (sync included), after an untimed warm-up
conversion of a few-MB model both ways (first imports); then each validation once
(import: checkpoint vs source; export: checkpoint vs export). Per step it prints peak resident
memory over the RSS at the step's start (sampled every 10 ms) divided by the largest layer's fp32
size (goal <= 4, the same at both depths), and for import and export the median time over the
median plain copy of the same bytes (goal <= 2), with the CPU seconds of both (every thread; on a
shared machine a ratio of wall times mostly measures the other load). ``--size small`` runs the
same steps on a model a few MB large (a check that the benchmark works, not a measurement).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENIZER = REPO / "flagscale" / "data" / "corpus" / "tokenizer.model"
SIZES = {
    "1b": dict(hidden_size=2048, num_attention_heads=32, num_query_groups=4,
               ffn_hidden_size=5632, vocab_size=32000, depths=(11, 22)),
    "small": dict(hidden_size=256, num_attention_heads=8, num_query_groups=2,
                  ffn_hidden_size=688, vocab_size=4100, depths=(2, 4)),
}


def model_config(size: str, layers: int):
    from flagscale.config import ModelConfig

    shape = {k: v for k, v in SIZES[size].items() if k != "depths"}
    return ModelConfig(num_layers=layers, max_position_embeddings=2048, rope_theta=10000.0,
                       params_dtype="bf16", **shape)


def write_hf(size: str, layers: int, path: str) -> None:
    """Child process: a random bf16 HF Llama directory, streamed tensor by tensor."""
    import json

    import torch

    from flagscale.convert import mapping as M
    from flagscale.convert.hf_config import hf_config_dict
    from flagscale.convert.safetensors_stream import plan_shards, write_sharded

    model = model_config(size, layers)
    wm = M.WeightMap.of(model)
    order = wm.hf_file_order()
    gen = torch.Generator().manual_seed(0)
    out = Path(path)
    out.mkdir(parents=True)
    tensors = ((name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
               for name, shape in order)
    write_sharded(out, plan_shards(order, torch.bfloat16, 2 * 1024 ** 3), torch.bfloat16,
                  tensors)
    config = hf_config_dict(model, "bfloat16", 1, 2, None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class RssSampler:
    """Peak resident set size of this process over its size at entry, sampled every 10 ms."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self.start = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = max(self.peak, self._proc.memory_info().rss) - self.start


def _cpu() -> float:
    """CPU seconds of this process so far, every thread, user and kernel."""
    times = os.times()
    return times.user + times.system


def _timed(fn) -> tuple[float, float, int]:
    """(seconds to durable disk, CPU seconds, peak RSS growth) of ``fn()``."""
    os.sync()
    with RssSampler() as rss:
        t0, c0 = time.perf_counter(), _cpu()
        fn()
        os.sync()
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    return seconds, cpu, rss.growth


def bench_depth(size: str, layers: int, rounds: int, work: Path) -> None:
    from flagscale.convert import hf_to_mcore, mapping as M, mcore_to_hf
    from flagscale.convert.export import checkpoint_config
    from flagscale.convert.validate import compare_layerwise

    hf = work / f"hf{layers}"
    child = mp.get_context("spawn").Process(target=write_hf, args=(size, layers, str(hf)))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the synthetic model failed (exit {child.exitcode})")
    wm = M.WeightMap.of(model_config(size, layers))
    layer_fp32 = 4 * sum(math.prod(e.mcore_shape(wm.dims)) for e in wm.layer)
    params = sum(math.prod(s) for _, s in wm.hf_file_order())
    quiet = dict(log=lambda *_: None, progress=False)
    ckpt, export = work / "ckpt", work / "export"
    times: dict[str, list[float]] = {k: [] for k in ("copy_hf", "import", "copy_ckpt", "export")}
    cpu: dict[str, list[float]] = {}
    growth: dict[str, int] = {}

    def step(name, fn):
        seconds, used, grown = _timed(fn)
        times.setdefault(name, []).append(seconds)
        cpu.setdefault(name, []).append(used)
        growth[name] = max(growth.get(name, 0), grown)

    for _ in range(rounds):
        for path in (ckpt, export):
            shutil.rmtree(path, ignore_errors=True)
        step("copy_hf", lambda: shutil.copytree(hf, work / "copy"))
        shutil.rmtree(work / "copy")
        step("import", lambda: hf_to_mcore(hf, ckpt, validate=False, **quiet))
        step("copy_ckpt", lambda: shutil.copytree(ckpt, work / "copy"))
        shutil.rmtree(work / "copy")
        step("export", lambda: mcore_to_hf(ckpt, export, dtype="bf16", validate=False,
                                           tokenizer=str(TOKENIZER), **quiet))
    cfg = checkpoint_config(ckpt)
    step("validate_import", lambda: compare_layerwise(ckpt, cfg, hf, **quiet))
    step("validate_export", lambda: compare_layerwise(ckpt, cfg, export, round_to="bf16",
                                                      **quiet))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"depth {layers}: {params / 1e9:.3f}B params, HF {_dir_bytes(hf) / 1e9:.2f} GB, "
          f"checkpoint {_dir_bytes(ckpt) / 1e9:.2f} GB, largest layer fp32 "
          f"{layer_fp32 / 1e6:.1f} MB; median of {rounds} alternating rounds")
    for name, copy in (("import", "copy_hf"), ("export", "copy_ckpt")):
        print(f"  {name:16s} {med[name]:7.2f}s vs plain copy {med[copy]:6.2f}s -> "
              f"{med[name] / med[copy]:.2f}x (goal <= 2); peak RSS +{growth[name] / 1e6:.0f} MB "
              f"= {growth[name] / layer_fp32:.2f}x the largest layer fp32 (goal <= 4); rounds "
              f"{', '.join(f'{t:.2f}' for t in times[name])}s; CPU {med_cpu[name]:.2f}s vs "
              f"{med_cpu[copy]:.2f}s for the copy")
    for name in ("validate_import", "validate_export"):
        print(f"  {name:16s} {med[name]:7.2f}s; peak RSS +{growth[name] / 1e6:.0f} MB = "
              f"{growth[name] / layer_fp32:.2f}x the largest layer fp32 (goal <= 4)")
    for path in (hf, ckpt, export):
        shutil.rmtree(path, ignore_errors=True)


def warm_up(work: Path) -> None:
    """Convert a model a few MB large both ways, untimed: the modules each step imports on first
    use and its first calls' set-up are paid here, not by whichever round comes first."""
    from flagscale.convert import hf_to_mcore, mcore_to_hf

    child = mp.get_context("spawn").Process(target=write_hf, args=("small", 2, str(work / "hf")))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the warm-up model failed (exit {child.exitcode})")
    quiet = dict(log=lambda *_: None, progress=False)
    hf_to_mcore(work / "hf", work / "ckpt", **quiet)
    mcore_to_hf(work / "ckpt", work / "export", tokenizer=str(TOKENIZER), **quiet)
    shutil.rmtree(work)


def main(argv=None) -> int:
    """Run the benchmark at each depth and print one block per depth."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--depths", default=None,
                        help="comma-separated layer counts of the same width (default per size)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds to time")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args(argv)
    depths = ([int(d) for d in args.depths.split(",")] if args.depths
              else SIZES[args.size]["depths"])
    work = Path(tempfile.mkdtemp(prefix="flagscale-bench-convert-", dir=args.workdir))
    try:
        warm_up(work / "warm-up")
        for layers in depths:
            bench_depth(args.size, layers, args.rounds, work)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

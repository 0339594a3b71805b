"""One-command check of the GPU path: train a ~1B Llama model in bf16, report throughput, save,
reload, export to Hugging Face and validate.

    make gpu-check                                   # or:
    python benchmarks/gpu_check.py [--iterations 300] [--gpus N] [--run-dir runs/gpu_check]

On a machine with NVIDIA GPUs (nothing downloaded: the bundled corpus and tokenizer) it
preprocesses the corpus, trains a 16-layer, 2048-wide Llama (0.89B parameters, GQA, SwiGLU,
RoPE) on every visible GPU with the cuda defaults (overlapped DDP, fused kernels, SDPA or
Transformer Engine attention, prefetching data path, manual GC), resumes it from its checkpoint
for a few more steps, and exports and validates the checkpoint with ``flagscale convert``.
Printed: tokens/s/GPU, TFLOP/s/GPU and MFU in Megatron's convention (causal attention) and, beside
it, NeMo's full-attention convention, from the median of the logged steps after warm-up. Exit 0
only if the loss falls and the export validates; on a machine without a GPU it exits 2 with a
message and prints no numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
             ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=2048,
             rope_theta=500000.0)
"""~1B Llama: 0.89B parameters (the bundled 4096-piece tokenizer uses the first ids of the
32000-row vocabulary)."""
SEQ, MICRO_BATCH, BATCH_PER_GPU = 2048, 4, 16
WARMUP_RECORDS = 3


def _flagscale(*args: str) -> None:
    print("$ flagscale " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "flagscale", *args], cwd=ROOT, check=True)


def _overrides(run_dir: Path, gpus: int, iterations: int, data: str) -> list[str]:
    return [*(f"model.{k}={v}" for k, v in MODEL.items()), "model.preset=null",
            "model.params_dtype=bf16", "parallel.dp=null", f"train.seq_length={SEQ}",
            f"train.micro_batch_size={MICRO_BATCH}",
            f"train.global_batch_size={BATCH_PER_GPU * gpus}", f"train.iterations={iterations}",
            "train.lr=3.0e-4", "train.min_lr=3.0e-5", "train.warmup_iterations=30",
            "train.log_interval=10", f"data.paths=[{data}]",
            f"checkpoint.save_interval={iterations}", "checkpoint.load=auto",
            f"run.dir={run_dir}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    parser.add_argument("--run-dir", default="runs/gpu_check")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no NVIDIA GPU is visible (torch.cuda.is_available() is False); this "
              "check measures the GPU path and reports nothing without one. Run it on a machine "
              "with NVIDIA GPUs and a CUDA build of torch.", file=sys.stderr)
        return 2
    gpus = args.gpus or torch.cuda.device_count()
    run_dir = (ROOT / args.run_dir).resolve()
    if (run_dir / "checkpoints").exists():
        print(f"gpu-check: {run_dir} holds an earlier run; remove it first.", file=sys.stderr)
        return 2
    data = run_dir / "data" / "corpus"
    _flagscale("preprocess", "--input", "flagscale/data/corpus/corpus.jsonl.gz",
               "--output-prefix", str(data), "--tokenizer", "flagscale/data/corpus/tokenizer.model")
    overrides = _overrides(run_dir, gpus, args.iterations, str(data))
    _flagscale("train", "examples/tiny/config.yaml", "--nproc", str(gpus), *overrides)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("tokens_per_sec_per_gpu")]
    steady = trained[WARMUP_RECORDS:] or trained
    # Reload: resume from the saved checkpoint for a few more steps.
    _flagscale("train", "examples/tiny/config.yaml", "--nproc", str(gpus),
               *_overrides(run_dir, gpus, args.iterations + 10, str(data)))
    # Beside the run, not in it: flagscale writes no command's output into a run directory.
    export = subprocess.run([sys.executable, "-m", "flagscale", "convert", "mcore-to-hf",
                             "--input", str(run_dir / "checkpoints"), "--output",
                             str(run_dir.with_name(run_dir.name + "_hf")), "--overwrite"],
                            cwd=ROOT)

    from flagscale.config import load_config
    from flagscale.metrics.devices import detect_device, peak_tflops
    from flagscale.metrics.flops import flops_per_token

    cfg = load_config(ROOT / "examples/tiny/config.yaml", overrides)
    tokens = statistics.median(r["tokens_per_sec_per_gpu"] for r in steady)
    megatron = flops_per_token(cfg.model, SEQ).flops_per_token * tokens / 1e12
    full = flops_per_token(cfg.model, SEQ, causal=False).flops_per_token * tokens / 1e12
    device = detect_device()
    peak = peak_tflops(device, "bf16")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    print(f"gpu-check on {gpus} x {device} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(f"  tokens/s/GPU        {tokens:,.0f}")
    for name, tflops in (("megatron (causal)", megatron), ("nemo (full attn)", full)):
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a (no bf16 peak for this device)"
        print(f"  {name:<18}  {tflops:.1f} TFLOP/s/GPU, MFU {mfu}")
    falls = len(losses) >= 2 and losses[-1] < losses[0]
    print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} ({'falls' if falls else 'DOES NOT FALL'})")
    print(f"  export + validation: {'ok' if export.returncode == 0 else 'FAILED'}")
    return 0 if falls and export.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

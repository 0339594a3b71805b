"""``flagscale flops``: parameters and training FLOPs per token of a model, and the MFU of a run.

    flagscale flops --model llama3_8b --seq-len 8192
    flagscale flops examples/tiny/config.yaml --json
    flagscale flops --model llama3_70b --gpus 64 --step-time 60 --global-batch 512 --device h100-sxm
    flagscale flops --model llama3_8b --convention palm

With a CONFIG the model, ``train.seq_length``, ``parallel.tp`` (vocabulary padding),
``train.recompute``, ``train.global_batch_size`` and ``metrics.device``/``metrics.peak_tflops`` come
from it; options override them. ``--gpus N --step-time T`` add tokens/s/GPU, TFLOP/s/GPU and MFU for
a measured step time, computed exactly as the training loop computes them.
"""

from __future__ import annotations

import argparse

from flagscale.cli import examples_epilog
from flagscale.config import CHOICES


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale flops``: print the report (``--json``: as JSON)."""
    import json

    from flagscale.metrics.report import flops_for, format_report

    report = flops_for(args.config, args.model, seq_len=args.seq_len, tp=args.tp,
                       convention=args.convention, recompute=args.recompute, gpus=args.gpus,
                       step_time_s=args.step_time, global_batch=args.global_batch,
                       device=args.device, dtype=args.dtype, peak_tflops=args.peak_tflops)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register(subparsers) -> None:
    """Add the ``flops`` sub-command."""
    parser = subparsers.add_parser(
        "flops", help="parameters, FLOPs per token and MFU of a model",
        description="Parameters and training FLOPs per token of a model, and the MFU of a run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog(__doc__))
    parser.add_argument("config", nargs="?", help="run config YAML")
    parser.add_argument("--model", help="model preset instead of a config (e.g. llama3_8b)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the config's, or "
                        "the preset's pretraining context)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (pads the vocabulary to a "
                        "multiple of 128*tp; default: config's or 1)")
    parser.add_argument("--convention", default="megatron",
                        help="FLOPs convention of the breakdown: megatron (default), palm or 6n")
    parser.add_argument("--recompute", choices=CHOICES["train.recompute"],
                        help="activation recomputation, reported as hardware FLOPs (HFU)")
    parser.add_argument("--json", action="store_true", help="print JSON for tools")
    parser.add_argument("--gpus", type=int, help="GPUs of the run (world size)")
    parser.add_argument("--step-time", type=float, help="measured seconds per optimizer step")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--device", help="device for MFU, a key of flagscale.metrics.devices."
                        "PEAK_TFLOPS such as h100-sxm or a100-80g (or a driver name); default: "
                        "config's metrics.device or the local GPU")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp8", "fp32"),
                        help="training precision for the device peak (default: config's or bf16)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s per GPU, overriding "
                        "the device table")
    parser.set_defaults(func=run)

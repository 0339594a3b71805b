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
import json
from typing import Optional

from flagscale.cli import examples_epilog
from flagscale.config import ModelConfig, default_seq_length, load_config
from flagscale.errors import ConfigError
from flagscale.metrics.devices import PEAK_TFLOPS, canonical_device, resolve_peak
from flagscale.metrics.flops import CONVENTIONS, count_params, flops_per_token, preset_model
from flagscale.metrics.throughput import ThroughputMeter


def flops_report(model: ModelConfig, seq_length: int, tp: int = 1, convention: str = "megatron",
                 recompute: str = "none", gpus: Optional[int] = None,
                 step_time_s: Optional[float] = None, global_batch: Optional[int] = None,
                 device: Optional[str] = None, dtype: str = "bf16",
                 peak_tflops: Optional[float] = None) -> dict:
    """Parameters and FLOPs per token of ``model`` (with breakdown) as plain data.

    Given ``gpus``, ``step_time_s`` and ``global_batch`` it adds a ``throughput`` section:
    tokens/s/GPU, TFLOP/s/GPU and, when the device's peak is known, MFU (Megatron convention
    FLOPs, whatever ``convention`` the breakdown uses, so it matches the training logs).
    """
    params = count_params(model)
    estimate = flops_per_token(model, seq_length, tp=tp, convention=convention, recompute=recompute)
    report = {"model": model.preset or "custom", "params": params.total,
              "params_non_embedding": params.non_embedding, "params_embedding": params.embedding,
              "tp": tp, **estimate.as_dict()}
    if gpus is None and step_time_s is None:
        return report
    if gpus is None or step_time_s is None or global_batch is None:
        raise ConfigError("Throughput needs --gpus, --step-time and --global-batch together (the "
                          "global batch comes from the config when one is given); got gpus="
                          f"{gpus}, step_time={step_time_s}, global_batch={global_batch}.")
    if gpus < 1 or step_time_s <= 0 or global_batch < 1:
        raise ConfigError(f"--gpus ({gpus}) and --global-batch ({global_batch}) must be >= 1 and "
                          f"--step-time ({step_time_s}) > 0.")
    if device is not None and peak_tflops is None and canonical_device(device) is None:
        raise ConfigError(f"Device '{device}' is not in the peak-throughput table (known: "
                          f"{', '.join(PEAK_TFLOPS)}); pass one of those or --peak-tflops.")
    device, peak, why = resolve_peak(device, dtype, peak_tflops)
    megatron = (estimate if convention == "megatron" else
                flops_per_token(model, seq_length, tp=tp, recompute=recompute))
    meter = ThroughputMeter(global_batch * seq_length, gpus, megatron, peak)
    metrics = meter.interval_metrics([step_time_s])
    report["throughput"] = {
        "gpus": gpus, "global_batch": global_batch, "step_time_s": step_time_s,
        "tokens_per_sec_per_gpu": metrics["tokens_per_sec_per_gpu"],
        "tflops_per_gpu": metrics["tflops_per_gpu"], "mfu": metrics["mfu"], "hfu": metrics["hfu"],
        "device": device, "dtype": dtype, "peak_tflops": peak, "flops_convention": "megatron",
        **({"mfu_unavailable": why} if peak is None else {})}
    return report


def format_report(report: dict) -> str:
    """The human-readable table of a :func:`flops_report`."""
    total = report["flops_per_token"]
    attention = ("causal" if report["causal_attention"] else "full") + " attention"
    if report["convention"] == "6n":
        attention = "no attention-context term"
    lines = [f"model {report['model']}: {report['params'] / 1e9:.3f}B parameters "
             f"({report['params_non_embedding'] / 1e9:.3f}B non-embedding), "
             f"seq_length {report['seq_length']}, vocab {report['vocab_size']} (tp {report['tp']})",
             f"training FLOPs per token, {report['convention']} convention ({attention}, "
             f"forward + backward, 2 FLOPs per multiply-add):",
             f"  {'term':<12}{'GFLOP/token':>14}{'share':>9}"]
    for name, value in report["breakdown"].items():
        lines.append(f"  {name:<12}{value / 1e9:>14.4f}{100 * value / total:>8.1f}%")
    lines.append(f"  {'total':<12}{total / 1e9:>14.4f}")
    if report["recompute"] != "none":
        lines.append(f"with {report['recompute']} recomputation the hardware executes "
                     f"{report['hardware_flops_per_token'] / 1e9:.4f} GFLOP/token (HFU; MFU "
                     f"uses the model FLOPs above)")
    tp = report.get("throughput")
    if tp:
        lines.append(f"throughput at {tp['step_time_s']:g} s/step, global batch "
                     f"{tp['global_batch']} x {report['seq_length']} tokens on {tp['gpus']} GPUs "
                     f"(megatron-convention FLOPs):")
        lines.append(f"  tokens/s/GPU  {tp['tokens_per_sec_per_gpu']:,.1f}")
        lines.append(f"  TFLOP/s/GPU   {tp['tflops_per_gpu']:.2f}")
        if tp["mfu"] is None:
            lines.append(f"  MFU           n/a ({tp['mfu_unavailable']})")
        else:
            lines.append(f"  MFU           {100 * tp['mfu']:.1f}% of {tp['peak_tflops']:g} "
                         f"TFLOP/s ({tp['device']}, {tp['dtype']})")
            if tp["mfu"] > 1:
                lines.append("  MFU above 100% is impossible: check the step time, the GPU count "
                             "and the device")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale flops``: resolve the model and defaults, print the report."""
    if (args.config is None) == (args.model is None):
        raise ConfigError("flagscale flops needs exactly one of CONFIG (a run config YAML) or "
                          "--model PRESET (e.g. --model llama3_8b).")
    if args.config is not None:
        cfg = load_config(args.config)
        model, seq, tp = cfg.model, cfg.train.seq_length, cfg.parallel.tp
        recompute, batch = cfg.train.recompute, cfg.train.global_batch_size
        device, peak, dtype = cfg.metrics.device, cfg.metrics.peak_tflops, cfg.model.params_dtype
    else:
        model = preset_model(args.model)
        seq, tp, recompute, batch = default_seq_length(model), 1, "none", None
        device, peak, dtype = None, None, "bf16"
    report = flops_report(
        model, args.seq_len or seq, tp=args.tp or tp, convention=args.convention,
        recompute=args.recompute or recompute, gpus=args.gpus, step_time_s=args.step_time,
        global_batch=args.global_batch or batch, device=args.device or device,
        dtype=args.dtype or dtype, peak_tflops=args.peak_tflops or peak)
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
    parser.add_argument("--convention", choices=CONVENTIONS, default="megatron",
                        help="FLOPs convention of the breakdown (default: megatron)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"),
                        help="activation recomputation, reported as hardware FLOPs (HFU)")
    parser.add_argument("--json", action="store_true", help="print JSON for tools")
    parser.add_argument("--gpus", type=int, help="GPUs of the run (world size)")
    parser.add_argument("--step-time", type=float, help="measured seconds per optimizer step")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    parser.add_argument("--device", help=f"device for MFU: {', '.join(PEAK_TFLOPS)} (or a driver "
                        f"name); default: config's metrics.device or the local GPU")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp8", "fp32"),
                        help="training precision for the device peak (default: config's or bf16)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s per GPU, overriding "
                        "the device table")
    parser.set_defaults(func=run)

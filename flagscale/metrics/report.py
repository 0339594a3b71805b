"""The ``flagscale flops`` report: parameters and training FLOPs per token of a model, with the
per-term breakdown, and tokens/s/GPU, TFLOP/s/GPU and MFU for a measured step time.

    report = flops_for(None, "llama3_8b", seq_len=8192)      # or a config path instead
    print(format_report(report)); json.dumps(report)
"""

from __future__ import annotations

from typing import Optional

from flagscale.config import ModelConfig, default_seq_length, load_config
from flagscale.errors import ConfigError
from flagscale.metrics.devices import PEAK_TFLOPS, canonical_device, resolve_peak
from flagscale.metrics.flops import (count_params, flops_per_token, preset_model,
                                    recompute_of_config)
from flagscale.metrics.throughput import ThroughputMeter


def flops_for(config: Optional[str], model: Optional[str], seq_len: Optional[int] = None,
              tp: Optional[int] = None, convention: str = "megatron",
              recompute: Optional[str] = None, gpus: Optional[int] = None,
              step_time_s: Optional[float] = None, global_batch: Optional[int] = None,
              device: Optional[str] = None, dtype: Optional[str] = None,
              peak_tflops: Optional[float] = None) -> dict:
    """:func:`flops_report` of a run config (``config``, a YAML path: model, sequence length,
    tp, recomputation, global batch, device and precision come from it) or of a model preset
    (``model``: its pretraining context, tp 1, bf16); the other arguments override either's."""
    if (config is None) == (model is None):
        raise ConfigError("flagscale flops needs exactly one of CONFIG (a run config YAML) or "
                          "--model PRESET (e.g. --model llama3_8b).")
    if config is not None:
        cfg = load_config(config)
        arch, seq, size = cfg.model, cfg.train.seq_length, cfg.parallel.tp
        # The config's recomputation in full (layers, modules), unless --recompute overrides it.
        default_recompute, batch = recompute_of_config(cfg), cfg.train.global_batch_size
        default_device, peak, precision = (cfg.metrics.device, cfg.metrics.peak_tflops,
                                           cfg.model.params_dtype)
    else:
        arch = preset_model(model)
        seq, size, default_recompute, batch = default_seq_length(arch), 1, {}, None
        default_device, peak, precision = None, None, "bf16"
    return flops_report(
        arch, seq_len or seq, tp=tp or size, convention=convention,
        **({"recompute": recompute} if recompute else default_recompute),
        gpus=gpus, step_time_s=step_time_s,
        global_batch=global_batch or batch, device=device or default_device,
        dtype=dtype or precision, peak_tflops=peak_tflops or peak)


def flops_report(model: ModelConfig, seq_length: int, tp: int = 1, convention: str = "megatron",
                 recompute: str = "none", gpus: Optional[int] = None,
                 step_time_s: Optional[float] = None, global_batch: Optional[int] = None,
                 device: Optional[str] = None, dtype: str = "bf16",
                 peak_tflops: Optional[float] = None, recompute_layers: Optional[int] = None,
                 recompute_modules: Optional[list] = None) -> dict:
    """Parameters and FLOPs per token of ``model`` (with breakdown) as plain data; the
    recomputation arguments are :func:`~flagscale.metrics.flops.flops_per_token`'s.

    Given ``gpus``, ``step_time_s`` and ``global_batch`` it adds a ``throughput`` section:
    tokens/s/GPU, TFLOP/s/GPU and, when the device's peak is known, MFU (Megatron convention
    FLOPs, whatever ``convention`` the breakdown uses, so it matches the training logs).
    """
    params = count_params(model)
    recomputation = {"recompute": recompute, "recompute_layers": recompute_layers,
                     "recompute_modules": recompute_modules}
    estimate = flops_per_token(model, seq_length, tp=tp, convention=convention, **recomputation)
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
                flops_per_token(model, seq_length, tp=tp, **recomputation))
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

"""``flagscale plan``: which parallel layouts of a model fit on N GPUs, with memory per GPU.

    flagscale plan examples/aquila2_34b/h100_64nodes.yaml --gpus 512
    flagscale plan --model llama3_8b --gpus 8 --seq-len 8192
    flagscale plan --model llama3_1_405b --gpus 1152 --recompute full --json
    flagscale plan --model aquila2_34b --gpus 512 --device a100-40g --seq-len 4096

With a CONFIG the model, precision, ``train.seq_length``, ``train.micro_batch_size``,
``train.global_batch_size`` (microbatches in flight, batch divisibility), ``train.recompute`` and
``parallel.distributed_optimizer`` come from it (options and key=value overrides win); the layout
the config asks for is marked. With ``--model`` the run is bf16 with the distributed optimizer at
the preset's pretraining context and micro batch 1. Estimates follow
``flagscale/plan/memory.py`` (Korthikanti et al. 2022 activations, megatron-core's buffers).
Exits 1 (after the table) when no layout fits.
"""

from __future__ import annotations

import argparse

from flagscale.cli import examples_epilog
from flagscale.config import CHOICES
from flagscale.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale plan``: print the table or, with ``--json``, the plan as JSON."""
    import json

    from flagscale.plan import format_plan, plan_for

    plan = plan_for(args.config, args.model, args.gpus, args.device, tuple(args.overrides),
                    args.seq_len, args.micro_batch, args.recompute, args.attention)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(format_plan(plan, limit=None if args.all else 12))
    if plan.best is None:
        smallest = min(lay.memory.total_gib for lay in plan.layouts)
        raise ConfigError(f"No layout of {plan.model} fits on {plan.gpus} x {plan.device}: the "
                          f"smallest needs {smallest:.1f} GiB per GPU, {plan.usable_gib:.1f} are "
                          f"usable. Raise --gpus, use --recompute selective or full, or a "
                          f"smaller --micro-batch / --seq-len.")
    return 0


def register(subparsers) -> None:
    """Add the ``plan`` sub-command."""
    parser = subparsers.add_parser(
        "plan", help="parallel layouts that fit on N GPUs, with memory per GPU",
        description="Enumerate tensor/pipeline/data-parallel layouts of a model on N GPUs and "
                    "estimate weights, gradients, optimizer state and activations per GPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog(__doc__))
    parser.add_argument("config", nargs="?", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.recompute=full")
    parser.add_argument("--model", help="model preset instead of a config (e.g. aquila2_34b)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the run (world size)")
    parser.add_argument("--device", default="h100-sxm",
                        help="GPU model, for its memory: a key of flagscale.plan."
                        "DEVICE_MEMORY_GIB such as h100-sxm (default), h200, a100-40g")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the config's, or "
                        "the preset's pretraining context)")
    parser.add_argument("--micro-batch", type=int, help="sequences per microbatch (default: the "
                        "config's, or 1)")
    parser.add_argument("--recompute", choices=CHOICES["train.recompute"],
                        help="activation recomputation (default: the config's, or none)")
    parser.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                        help="attention kernel: flash (Transformer Engine fused attention, the "
                        "GPU default) or unfused (megatron-core local spec, stores the scores)")
    parser.add_argument("--json", action="store_true", help="print JSON for tools")
    parser.add_argument("--all", action="store_true", help="show every layout, not the first 12")
    parser.set_defaults(func=run)

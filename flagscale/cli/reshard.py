"""``flagscale reshard --input CKPT --output CKPT [--tp N] [--pp N] [--dp N] [--vpp N]``

Rewrite a training checkpoint for another layout, Adam moments and fp32 master weights included:

    flagscale reshard --input runs/a/checkpoints --output ckpt/a_tp2 --tp 2 --dp 1
    flagscale train CONFIG parallel.tp=2 checkpoint.load=ckpt/a_tp2     # resumes exactly

The output is saved fully_reshardable (megatron-core's format that loads at any TP/PP/DP), with
every real embedding/output row kept when the vocabulary padding changes. A flagscale training
checkpoint is converted in this one process, tensor by tensor, reading only the byte ranges it
needs and never building the model (peak memory: a few times the largest parameter); a progress
bar counts the bytes. Only bucket-space optimizer state without flagscale's parameter index maps
(another tool's dp_reshardable save) is loaded by tp*pp*dp local worker processes at its own
layout, on --platform (default: the checkpoint config's). Unset --tp/--pp keep the checkpoint's;
unset --dp keeps its world size. --output may not be, hold or lie inside the input, a training
run or a checkpoint.
"""

from __future__ import annotations

import argparse


def run_reshard(args) -> int:
    """CLI wrapper of :func:`flagscale.train.reshard.reshard`."""
    from flagscale.checkpoint.output import check_output_location

    check_output_location(args.output, [args.input])  # before the slow imports and reads
    from flagscale.checkpoint.megatron_lm import find_megatron_lm

    if find_megatron_lm(args.input) is not None:
        from flagscale.train.megatron_lm_import import reshard_megatron_lm

        reshard_megatron_lm(args.input, args.output, platform=args.platform, tp=args.tp,
                            pp=args.pp, dp=args.dp, vpp=args.vpp, overwrite=args.overwrite)
        return 0
    from flagscale.train.reshard import reshard

    reshard(args.input, args.output, tp=args.tp, pp=args.pp, dp=args.dp, vpp=args.vpp,
            overwrite=args.overwrite, platform=args.platform)
    return 0


def register(subparsers) -> None:
    """Add ``flagscale reshard``."""
    p = subparsers.add_parser("reshard", help="rewrite a checkpoint for another TP/PP/DP layout",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True,
                   help="checkpoint: an iter_XXXXXXX dir, a checkpoints/ dir (uses 'latest') or a "
                        "run dir")
    p.add_argument("--output", required=True,
                   help="checkpoint directory to write (pass it as checkpoint.load)")
    p.add_argument("--tp", type=int, default=None, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="target pipeline-parallel size")
    p.add_argument("--dp", type=int, default=None, help="target data-parallel size")
    p.add_argument("--vpp", type=int, default=None,
                   help="target virtual pipeline stages per rank (default: the checkpoint's while "
                        "pp is unchanged, else none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier reshard output at --output (only once the new "
                        "checkpoint is complete); other directories are never replaced")
    p.add_argument("--platform", choices=("auto", "cpu", "cuda"), default=None,
                   help="worker platform (default: the checkpoint config's)")
    p.set_defaults(func=run_reshard)

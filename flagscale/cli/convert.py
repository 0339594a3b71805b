"""``flagscale convert mcore-to-hf|hf-to-mcore``: Hugging Face <-> megatron-core checkpoints.

    flagscale convert mcore-to-hf --input runs/tiny/checkpoints --output hf/tiny --dtype bf16
    flagscale convert mcore-to-hf --input runs/tiny/checkpoints/iter_0000020 --output hf/tiny \\
        --skip-validation --overwrite
    flagscale convert hf-to-mcore --input hf/llama3_8b --output ckpt/llama3_8b --tp 8 --pp 4
    flagscale train CONFIG checkpoint.load=ckpt/llama3_8b      # continued pretraining

Both directions stream one layer at a time (memory: a few layers, whatever the model's depth) and
by default compare flagscale's megatron-core model with transformers' model layer by layer (hidden
states after the embedding and every layer, then the logits), naming the first layer that
differs; --skip-validation skips that. mcore-to-hf reads any TP/PP/VPP checkpoint in one process.
hf-to-mcore writes model weights only (the training run that loads it starts a fresh optimizer at
iteration 0) and refuses safetensors tensors its family's mapping would drop.

--output may not be, hold or lie inside the input, a training run or a checkpoint. It is written
under a temporary name and renamed when complete; --overwrite replaces only an earlier output of
the same command (marked by its .flagscale-output.json), never another directory.
"""

from __future__ import annotations

import argparse


def run_mcore_to_hf(args) -> int:
    """CLI wrapper of :func:`flagscale.convert.mcore_to_hf`."""
    from flagscale.checkpoint.output import check_output_location

    check_output_location(args.output, [args.input])  # before the slow imports and reads
    from flagscale.checkpoint.megatron_lm import find_megatron_lm
    from flagscale.convert import mcore_to_hf

    export = mcore_to_hf
    if find_megatron_lm(args.input) is not None:
        from flagscale.train.megatron_lm_import import megatron_lm_to_hf as export
    result = export(args.input, args.output, dtype=args.dtype,
                    validate=not args.skip_validation, overwrite=args.overwrite,
                    tokenizer=args.tokenizer,
                    max_shard_bytes=int(args.max_shard_size_gb * 1024 ** 3))
    print(result.summary())
    return 0


def run_hf_to_mcore(args) -> int:
    """CLI wrapper of :func:`flagscale.convert.hf_to_mcore`."""
    from flagscale.checkpoint.output import check_output_location

    check_output_location(args.output, [args.input])
    from flagscale.convert import hf_to_mcore

    hf_to_mcore(args.input, args.output, tp=args.tp, pp=args.pp, overwrite=args.overwrite,
                validate=not args.skip_validation)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's sub-commands and options (shared with tools/convert/convert.py)."""
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    export = sub.add_parser("mcore-to-hf",
                            help="megatron-core checkpoint -> Hugging Face directory",
                            description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    export.add_argument("--input", required=True,
                        help="checkpoint: an iter_XXXXXXX dir, a checkpoints/ dir (uses 'latest') "
                             "or a run dir; or a Megatron-LM checkpoint (legacy or torch_dist)")
    export.add_argument("--output", required=True, help="Hugging Face model directory to write")
    export.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="weight dtype of the export (default bf16)")
    export.add_argument("--skip-validation", action="store_true",
                        help="do not compare the export's logits with flagscale's model")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier mcore-to-hf export at --output (only once the "
                             "new export is complete); other directories are never replaced")
    export.add_argument("--tokenizer", default=None,
                        help="tokenizer to export instead of the checkpoint config's "
                             "data.tokenizer")
    export.add_argument("--max-shard-size-gb", type=float, default=5.0,
                        help="largest safetensors file (default 5)")
    export.set_defaults(func=run_mcore_to_hf)
    imp = sub.add_parser("hf-to-mcore", help="Hugging Face directory -> megatron-core checkpoint",
                         description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    imp.add_argument("--input", required=True, help="Hugging Face model directory (Llama family)")
    imp.add_argument("--output", required=True,
                     help="checkpoint directory to write (pass it as checkpoint.load)")
    imp.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel size the checkpoint is meant for (sets vocab padding)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size it is meant for")
    imp.add_argument("--skip-validation", action="store_true",
                     help="do not compare the checkpoint with transformers' model layer by layer")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace an earlier hf-to-mcore import at --output (only once the new "
                          "one is complete); other directories are never replaced")
    imp.set_defaults(func=run_hf_to_mcore)


def register(subparsers) -> None:
    """Add ``flagscale convert``."""
    parser = subparsers.add_parser("convert", help="convert checkpoints to/from Hugging Face",
                                   description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(parser)

"""Standalone Hugging Face <-> megatron-core converter: the same code as ``flagscale convert``.

    python tools/convert/convert.py mcore-to-hf --input runs/tiny/checkpoints --output hf/tiny
    python tools/convert/convert.py hf-to-mcore --input hf/llama3_8b --output ckpt/llama3_8b --tp 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flagscale.cli.convert import add_arguments  # noqa: E402
from flagscale.errors import FlagScaleError  # noqa: E402
from flagscale.platform import megatron_quiet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the converter's arguments and run it; user errors print as one paragraph."""
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with megatron_quiet():
            return args.func(args)
    except FlagScaleError as exc:
        if args.debug:
            raise
        print(f"convert.py {args.direction}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

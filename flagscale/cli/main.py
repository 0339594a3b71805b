"""The ``flagscale`` command line.

    flagscale train examples/tiny/config.yaml --nproc 2 train.iterations=20
    flagscale <command> --help

Each command lives in its own module of this package, defining ``register(subparsers)`` which adds
a sub-parser whose ``func(args)`` parses, calls one importable, documented function and prints its
result. Command modules import torch, megatron-core and other heavy packages only inside ``func``,
so ``--help`` stays fast. Errors a user can fix (:class:`flagscale.errors.FlagScaleError`) print as
one paragraph without a traceback unless ``--debug`` is given; in a worker started by
:mod:`flagscale.launch.local` the paragraph goes to that launcher, which prints it once for all
ranks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import flagscale
from flagscale.errors import FlagScaleError
from flagscale.platform import megatron_quiet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flagscale",
        description="Pretrain dense Llama-family models on megatron-core: train, preprocess, "
                    "trace, reshard, convert, flops, plan, launch.")
    parser.add_argument("--version", action="version", version=flagscale.__version__)
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module("flagscale.cli")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name in ("main", "__main__") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"flagscale.cli.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may follow options (`train CFG --nproc 2 parallel.tp=2`); argparse stops
    # collecting positionals at the first option, so gather the rest here.
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides += overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _join_launcher()
    try:
        with megatron_quiet():
            result = args.func(args)
    except FlagScaleError as exc:
        if args.debug:
            raise
        from flagscale.launch.local import report_worker_error

        message = f"flagscale {args.command}: error: {exc}"
        if not report_worker_error(message):
            print(message, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


def _join_launcher() -> None:
    """In a worker of flagscale's launcher: die with it, and let every process this worker forks
    (checkpoint writers) die with this one."""
    from flagscale.launch.local import LAUNCHER_ENV

    if "RANK" in os.environ and LAUNCHER_ENV in os.environ:
        from flagscale.platform.lifetime import children_die_with_me, die_with_parent

        die_with_parent(int(os.environ[LAUNCHER_ENV]))
        children_die_with_me()


if __name__ == "__main__":
    sys.exit(main())

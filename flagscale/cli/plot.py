"""``flagscale plot``: PNG charts of a run's loss, tokens/s/GPU and MFU against iteration.

    flagscale plot runs/tiny
    flagscale plot runs/tiny --output-dir /tmp/tiny_plots

Reads ``RUN_DIR/metrics.jsonl`` and writes ``RUN_DIR/plots/*.png`` (or ``--output-dir``).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale plot``: draw the charts and name the files written."""
    from flagscale.metrics.plot import plot_metrics

    for path in plot_metrics(args.run_dir, args.output_dir):
        print(path)
    return 0


def register(subparsers) -> None:
    """Add the ``plot`` sub-command."""
    parser = subparsers.add_parser(
        "plot", help="PNG charts of loss, tokens/s/GPU and MFU of a run",
        description="PNG charts of a run's loss, tokens/s/GPU and MFU against iteration, from "
                    "RUN_DIR/metrics.jsonl.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run.dir)")
    parser.add_argument("--output-dir", help="where to write the PNGs (default: RUN_DIR/plots)")
    parser.set_defaults(func=run)

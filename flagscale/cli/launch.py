"""``flagscale launch CONFIG --slurm --nodes N``: train on a Slurm cluster.

    flagscale launch examples/aquila2_34b/h100_64nodes.yaml --slurm --nodes 64 --dry-run
    flagscale launch examples/aquila2_34b/h100_64nodes.yaml --slurm --nodes 64 \\
        --partition gpu --time 2-00:00:00 --account myproj train.iterations=1000
    flagscale launch examples/llama3_8b/h100_1node.yaml --slurm --nodes 1

Validates the config for nodes x gpus-per-node processes and checks with the memory planner that
its layout fits in the GPUs' memory (``flagscale plan``; ``--force`` launches a layout that does
not), writes the resolved config and an sbatch script under ``run.dir/slurm/`` and submits it
with ``sbatch`` (``--dry-run``: writes and prints them without submitting). Each node runs one
torchrun; see ``flagscale/launch/slurm.py``. On a single machine use ``flagscale train`` instead.
"""

from __future__ import annotations

import argparse
import shlex

from flagscale.errors import ConfigError
from flagscale.launch.slurm import SlurmOptions, launch_slurm

DEFAULT_DEVICE = "h100-sxm"
"""The GPU the memory check assumes when neither --device nor the config's metrics.device names
one (the one the example configs are sized for)."""


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale launch``: write (and unless ``--dry-run`` submit) the Slurm job."""
    if not args.slurm:
        raise ConfigError("flagscale launch only knows Slurm so far: add --slurm (with --nodes "
                          "N), or start a single-machine run with `flagscale train CONFIG`.")
    if args.nodes is None:
        raise ConfigError("flagscale launch --slurm needs --nodes N (nodes of the job).")
    opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        partition=args.partition, time=args.time, account=args.account,
                        job_name=args.job_name)
    from flagscale.plan import configured_layout, require_fit, usable_gib

    planned = []

    def check_memory(cfg, world: int) -> None:
        device = args.device or cfg.metrics.device or DEFAULT_DEVICE
        try:
            planned.append((require_fit(cfg, world, device), device))
        except ConfigError as exc:
            if not args.force:
                raise ConfigError(f"{args.config} on {args.nodes} node(s) x {args.gpus_per_node} "
                                  f"{device}: {exc} Check with `flagscale plan {args.config} "
                                  f"--gpus {world} --device {device}`, or pass --force to launch "
                                  f"anyway.") from None
            planned.append((configured_layout(cfg, world, device), device))

    job = launch_slurm(args.config, args.overrides, opts, dry_run=args.dry_run,
                       check=check_memory)
    lay, device = planned[0]
    note = (f"# memory: {lay.memory.total_gib:.1f} GiB per GPU planned for "
            f"{lay.dims.describe()}, {usable_gib(device):.1f} usable on a {device}"
            f"{'' if lay.fits else ' (does not fit; launched with --force)'}")
    if args.dry_run:
        print(job.script.read_text(), end="")
        print(note)
        print(f"# resolved config: {job.config}")
        print(f"# not submitted (--dry-run); submit with: {shlex.join(job.command)}")
    else:
        print(note)
        print(f"{job.submitted} ({job.job_name}, {job.world_size} GPUs; script {job.script})")
    return 0


def register(subparsers) -> None:
    """Add the ``launch`` sub-command."""
    parser = subparsers.add_parser(
        "launch", help="train on a Slurm cluster (writes and submits an sbatch script)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.iterations=100")
    parser.add_argument("--slurm", action="store_true", help="launch through Slurm (required)")
    parser.add_argument("--nodes", type=int, help="nodes of the job")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write and print the script and the sbatch command, do not submit")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", help="wall-clock limit, e.g. 2-00:00:00")
    parser.add_argument("--account", help="Slurm account to charge")
    parser.add_argument("--job-name", help="job name (default flagscale-<run dir name>)")
    parser.add_argument("--device", default=None,
                        help="GPU model for the memory check, a key of flagscale.plan."
                             "DEVICE_MEMORY_GIB (default: the config's metrics.device, else "
                             f"{DEFAULT_DEVICE})")
    parser.add_argument("--force", action="store_true",
                        help="launch even when the memory planner says the layout does not fit")
    parser.set_defaults(func=run)

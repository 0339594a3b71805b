"""``flagscale launch CONFIG --slurm --nodes N``: train on a Slurm cluster.

    flagscale launch examples/aquila2_34b/h100_64nodes.yaml --slurm --nodes 64 --dry-run
    flagscale launch examples/aquila2_34b/h100_64nodes.yaml --slurm --nodes 64 \\
        --partition gpu --time 2-00:00:00 --account myproj train.iterations=1000
    flagscale launch examples/llama3_8b/h100_1node.yaml --slurm --nodes 1

Validates the config for nodes x gpus-per-node processes, writes the resolved config and an sbatch
script under ``run.dir/slurm/`` and submits it with ``sbatch`` (``--dry-run``: writes and prints
them without submitting). Each node runs one torchrun; see ``flagscale/launch/slurm.py``. On a
single machine use ``flagscale train`` instead.
"""

from __future__ import annotations

import argparse
import shlex

from flagscale.errors import ConfigError
from flagscale.launch.slurm import SlurmOptions, launch_slurm


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
    job = launch_slurm(args.config, args.overrides, opts, dry_run=args.dry_run)
    if args.dry_run:
        print(job.script.read_text(), end="")
        print(f"# resolved config: {job.config}")
        print(f"# not submitted (--dry-run); submit with: {shlex.join(job.command)}")
    else:
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
    parser.set_defaults(func=run)

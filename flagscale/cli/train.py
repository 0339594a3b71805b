"""``flagscale train CONFIG [--nproc N] [--dry-run] [key=value ...]``

Started by torchrun (RANK set) it runs as one worker; otherwise it validates the config for the
requested world size and starts that many local workers itself (:mod:`flagscale.launch.local`:
Ctrl-C, SIGTERM or SIGUSR1 make every worker save after its current step and exit with status 75,
to be continued with ``checkpoint.load=auto``; a second Ctrl-C aborts):

    flagscale train examples/tiny/config.yaml                 # world size from the config
    flagscale train examples/tiny/config.yaml --nproc 2 parallel.tp=2 train.iterations=20
    flagscale train examples/tiny/config.yaml --dry-run       # resolved config and layout only
"""

from __future__ import annotations

import argparse
import os

from flagscale.config import dump_config, key_docs, load_config, world_size_of


def run_train(config: str, overrides: list[str], nproc: int | None = None,
              dry_run: bool = False) -> int:
    """Validate ``config`` + ``overrides``, then train (as a worker) or launch local workers."""
    cfg = load_config(config, overrides)
    if "RANK" in os.environ:
        from flagscale.train.trainer import train

        return train(cfg)
    from flagscale.train.preflight import check_run
    from flagscale.train.run_dir import check_run_dir

    layout = check_run(cfg, world_size_of(cfg) if nproc is None else nproc)
    # The run directory's lock and the resume check again in rank 0 (a torchrun or Slurm launch
    # skips this pass); here they fail before any worker starts.
    check_run_dir(cfg)
    if dry_run:
        print(dump_config(cfg), end="")
        print(f"# layout: {layout.describe()}; padded vocab {layout.padded_vocab_size}")
        if cfg.train.rampup_batch_size:
            from flagscale.data.datasets import BatchSchedule

            print(f"# {BatchSchedule.for_training(cfg, layout.dp).describe_ramp()}")
        return 0
    from flagscale.launch.local import run_local

    return run_local(layout.world_size, ["train", config, *overrides])


def _print_keys() -> int:
    for key, doc in key_docs().items():
        print(f"{key:36s} {doc}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (launches local workers if needed)",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    p.add_argument("--nproc", type=int, default=None,
                   help="local worker processes (default: tp*pp*cp*dp of the config)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and layout, then exit")
    p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    p.set_defaults(func=lambda a: _print_keys() if a.keys else run_train(
        a.config or p.error("CONFIG is required"), a.overrides, a.nproc, a.dry_run))

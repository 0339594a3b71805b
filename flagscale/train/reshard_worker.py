"""Worker entry of ``flagscale reshard``, started by :func:`flagscale.train.reshard.reshard` on
every local process (``torchrun ... -m flagscale.train.reshard_worker PLAN.json``) for a source
whose bucket-space optimizer state has no parameter index maps (everything else converts
offline, in one process); not a user command.

The plan names the input checkpoint, the platform and the layouts to load and save at.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from flagscale.errors import FlagScaleError
    from flagscale.platform import megatron_quiet
    from flagscale.train.reshard import run_plan

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m flagscale.train.reshard_worker PLAN.json (started by "
              "`flagscale reshard`)", file=sys.stderr)
        return 2
    try:
        with megatron_quiet():
            run_plan(argv[0])
    except FlagScaleError as exc:
        print(f"flagscale reshard worker: error: {exc}", file=sys.stderr)
        return 1
    return 0


# torch_dist's checkpoint writer starts a spawn-based multiprocessing Manager, which re-imports
# this module: the work must stay under the guard.
if __name__ == "__main__":
    sys.exit(main())

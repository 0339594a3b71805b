"""Worker entry of ``flagscale reshard``, started by :func:`flagscale.train.reshard.reshard` on
every local process (``torchrun ... -m flagscale.train.reshard_worker PLAN.json``) for a source
whose bucket-space optimizer state has no parameter index maps (everything else converts
offline, in one process); not a user command.

The plan names the input checkpoint, the platform and the layouts to load and save at.
"""

from __future__ import annotations

import sys
from typing import Callable


def run_worker(argv: list[str], work: Callable[[str], None], name: str, started_by: str) -> int:
    """The body of a conversion worker's entry: ``work(PLAN.json)`` with megatron-core's noise
    muted, a flagscale error printed as one line (status 1), a wrong command line status 2."""
    from flagscale.errors import FlagScaleError
    from flagscale.platform import megatron_quiet

    if len(argv) != 1:
        print(f"usage: python -m {name} PLAN.json (started by {started_by})", file=sys.stderr)
        return 2
    try:
        with megatron_quiet():
            work(argv[0])
    except FlagScaleError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from flagscale.train.reshard import run_plan

    return run_worker(sys.argv[1:] if argv is None else argv, run_plan,
                      "flagscale.train.reshard_worker", "`flagscale reshard`")


# torch_dist's checkpoint writer starts a spawn-based multiprocessing Manager, which re-imports
# this module: the work must stay under the guard.
if __name__ == "__main__":
    sys.exit(main())

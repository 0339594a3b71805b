"""Which config trained which iterations of a run, and which keys may change on a resume.

``run.dir/config.yaml`` is the resolved config of the run's latest start. When a run resumes at
iteration N with a config that differs from the previous ``config.yaml`` (only in keys of
:data:`RESUMABLE_CHANGES`, or others with ``run.allow_config_change``), the previous one is kept as
``config.N.yaml``: it trained the iterations up to N that survive in the checkpoint. So for
iteration ``i`` the config that trained it is ``config.M.yaml`` with the smallest ``M >= i``, or
``config.yaml`` when there is none (:func:`config_for_iteration`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

RESUMABLE_CHANGES = (
    # How long the run goes and how often it logs, evaluates, saves: the math of a step is the same.
    "train.iterations", "train.stop_iteration", "train.log_interval", "train.eval_interval",
    "train.eval_iterations",
    # The parallel layout and what only trades memory for time (checkpoints reshard on load).
    "parallel.", "train.micro_batch_size", "train.recompute", "train.recompute_method",
    "train.recompute_num_layers", "train.recompute_modules", "train.manual_gc_interval",
    "train.check_for_nan_in_grad", "platform",
    # Where and how the run saves, reports and is launched.
    "checkpoint.", "metrics.", "trace.", "run.", "launch.",
    # Resuming past bad batches is what this key is for.
    "data.skip_iterations",
)
"""Config keys (exact, or a section prefix ending in ``.``) that a resume may change; any other
difference from the checkpoint's config is a different experiment and is refused unless
``run.allow_config_change`` is set."""

_HISTORY = re.compile(r"^config\.(\d+)\.yaml$")


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def config_changes(saved: dict, current: dict, only_fixed: bool = True) -> list[str]:
    """``"key: saved -> current"`` for every key both resolved configs hold with different values
    (keys one of them lacks, e.g. added by a later flagscale, are not compared); with
    ``only_fixed`` the keys a resume may change are left out."""
    old, new = flatten(saved), flatten(current)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and not (only_fixed and resumable(key))]


def config_history(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(N, run_dir/config.N.yaml)`` of every kept earlier config, ascending N."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _HISTORY.match(p.name))]
    return sorted(found)


def config_for_iteration(run_dir: str | os.PathLike, iteration: int) -> Optional[Path]:
    """The kept config that trained ``iteration``; None when ``config.yaml`` (the latest) did."""
    return next((path for last, path in config_history(run_dir) if iteration <= last), None)


def write_run_config(run_dir: str | os.PathLike, text: str, resumed_from: int) -> Optional[Path]:
    """Write ``text`` as ``run_dir/config.yaml`` (atomically) for a run that starts at iteration
    ``resumed_from`` (0: fresh); returns the earlier config it kept, if any.

    A previous, different ``config.yaml`` is kept as ``config.<resumed_from>.yaml`` unless that
    file exists (an earlier attempt resumed from the same checkpoint: the iterations up to it were
    trained by the config kept then). Kept configs of iterations after ``resumed_from`` describe
    iterations this run trains again, and are removed.
    """
    run_dir = Path(run_dir)
    current = run_dir / "config.yaml"
    for last, path in config_history(run_dir):
        if last > resumed_from:
            path.unlink()
    kept = run_dir / f"config.{resumed_from}.yaml"
    if resumed_from > 0 and current.is_file() and not kept.exists() \
            and current.read_text() != text:
        os.replace(current, kept)
    else:
        kept = None
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, current)
    return kept

"""Checkpoint directory naming: ``checkpoints/iter_XXXXXXX/`` and the ``latest`` pointer file.

A checkpoint directory only ever appears under its final name once every rank has finished
writing it (it is written as ``iter_XXXXXXX.partial`` and renamed), and ``latest`` is replaced
atomically afterwards, so whatever ``latest`` names is complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from flagscale.errors import CheckpointError

LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")


def iteration_dir(checkpoints: Path, iteration: int) -> Path:
    return Path(checkpoints) / f"iter_{iteration:07d}"


def partial_dir(checkpoints: Path, iteration: int) -> Path:
    return Path(checkpoints) / f"iter_{iteration:07d}.partial"


def write_latest(checkpoints: Path, final: Path) -> None:
    """Point ``latest`` at ``final`` (atomic replace)."""
    tmp = Path(checkpoints) / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, Path(checkpoints) / LATEST)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Every complete ``iter_`` directory, oldest first."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and _ITER.match(p.name)
             and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoints: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None when there is none."""
    pointer = Path(checkpoints) / LATEST
    if not pointer.is_file():
        return None
    target = Path(checkpoints) / pointer.read_text().strip()
    if not (target / "metadata.json").is_file():
        raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete. "
                              f"Point it at a complete iter_ directory "
                              f"({', '.join(p.name for p in complete_checkpoints(checkpoints)) or 'none found'}) "
                              f"or remove it to start fresh.")
    return target


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept an ``iter_`` dir, a ``checkpoints/`` dir with ``latest``, or a run dir."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"{path} is not a checkpoint: no metadata.json in it and no "
                          f"'latest' file naming one. Give an iter_XXXXXXX directory, a "
                          f"checkpoints/ directory or a run directory.")

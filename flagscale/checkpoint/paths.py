"""Checkpoint directory naming: ``checkpoints/iter_XXXXXXX/`` and the ``latest`` pointer file, and
what makes a checkpoint directory complete.

A checkpoint directory only ever appears under its final name once every rank has finished
writing it (it is written as ``iter_XXXXXXX.partial`` and renamed), and ``latest`` is replaced
atomically afterwards. Files can still go missing or be cut short afterwards (a copy that ran out
of space, a deletion interrupted half way, a bad disk), so a directory is only called complete once
:func:`checkpoint_problem` finds every file its metadata names, each as large as the data it holds.
``checkpoint.load=auto`` takes the newest complete one and says what was wrong with any newer one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional

from flagscale.errors import CheckpointError

LATEST = "latest"
FLAGSCALE_FILES = ("flagscale_config.yaml",)
"""Files flagscale writes into each checkpoint beside megatron-core's (checked for checkpoints of a
run's ``checkpoints/`` directory; a Megatron-LM checkpoint given explicitly has none)."""
DELETING = ".deleting"
"""Suffix of a checkpoint being deleted: renamed first, so a deletion cut short never leaves a
directory named like a checkpoint."""
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


def checkpoint_problem(path: Path, flagscale_files: bool = True) -> Optional[str]:
    """What keeps ``path`` from being a complete checkpoint (naming the file), or None.

    Reads only metadata: ``metadata.json`` (the backend), ``common.pt`` (present), and for the
    ``torch_dist`` backend its ``.metadata``, which names the file and byte range of every stored
    item: each named file must exist and reach the end of the last range it holds.
    ``flagscale_files`` also requires :data:`FLAGSCALE_FILES`.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    marker = path / "metadata.json"
    if not marker.is_file():
        return f"{marker} is missing"
    try:
        backend = json.loads(marker.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{marker} is unreadable ({exc})"
    required = ["common.pt", *(FLAGSCALE_FILES if flagscale_files else ())]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"{path / missing[0]} is missing"
    if backend != "torch_dist":
        return None  # other backends (zarr, legacy) name no storage files to check
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as exc:  # a truncated pickle raises EOFError, UnpicklingError, ...
        return f"{path / '.metadata'} is missing or unreadable ({type(exc).__name__}: {exc})"
    ends: dict[str, int] = defaultdict(int)
    for info in storage.values():
        ends[info.relative_path] = max(ends[info.relative_path], info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {shard} is missing"
        size = shard.stat().st_size
        if size < end:
            return f"shard {shard} is truncated ({size} bytes, its data reaches byte {end})"
    return None


def _iteration_dirs(checkpoints: Path) -> list[Path]:
    """Every directory named like a checkpoint, oldest first (complete or not)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    return sorted((p for p in checkpoints.iterdir() if p.is_dir() and _ITER.match(p.name)),
                  key=lambda p: p.name)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Every complete ``iter_`` directory of a run's ``checkpoints/``, oldest first."""
    return [p for p in _iteration_dirs(checkpoints) if checkpoint_problem(p) is None]


def retire_checkpoints(checkpoints: Path, keep_last: int) -> list[Path]:
    """Rename every checkpoint directory older than the newest ``keep_last`` complete ones to
    ``<name>.deleting`` (one atomic rename each, so an interrupted deletion never leaves a
    directory that looks like a checkpoint); returns those directories, with any left by an
    earlier interrupted deletion, for the caller to delete."""
    checkpoints = Path(checkpoints)
    kept = complete_checkpoints(checkpoints)[-keep_last:]
    if not kept:
        return []
    retired = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.endswith(DELETING)]
    for old in _iteration_dirs(checkpoints):
        if old.name < kept[0].name:
            target = old.with_name(old.name + DELETING)
            if target in retired:
                retired.remove(target)
                shutil.rmtree(target)
            os.replace(old, target)
            retired.append(target)
    return retired


def _latest_name(pointer: Path) -> tuple[Optional[str], Optional[str]]:
    """(the ``iter_`` name ``latest`` holds, None) or (None, why it holds none)."""
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{pointer} is unreadable ({type(exc).__name__})"
    if not _ITER.match(name):
        return None, f"{pointer} holds {name[:40]!r}, not an iter_XXXXXXX name"
    return name, None


def latest_checkpoint(checkpoints: Path) -> Optional[Path]:
    """The checkpoint to resume ``checkpoints/`` from: the one ``latest`` names when it is
    complete, else the newest complete one (older than the one ``latest`` names, if it names
    one), with a one-line warning saying what was wrong. None when there is no complete one."""
    checkpoints = Path(checkpoints)
    pointer = checkpoints / LATEST
    candidates = _iteration_dirs(checkpoints)
    if pointer.is_file():
        name, why = _latest_name(pointer)
        if name is not None:
            problem = checkpoint_problem(checkpoints / name)
            if problem is None:
                return checkpoints / name
            why = f"{pointer} names {name}, but {problem}"
            # Newer directories than the one latest names belong to an abandoned history
            # (a rewind), never to this one.
            candidates = [p for p in candidates if p.name < name]
    elif not candidates:
        return None
    else:
        why = f"{pointer} is missing"
    fallback = next((p for p in reversed(candidates) if checkpoint_problem(p) is None), None)
    warnings.warn(f"{why}; " + (f"using {fallback.name}, the newest complete checkpoint."
                                if fallback else "no complete checkpoint found."), stacklevel=2)
    return fallback


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept an ``iter_`` dir, a ``checkpoints/`` dir with ``latest``, or a run dir; an ``iter_``
    dir must be complete (CheckpointError naming the missing or truncated file)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        problem = checkpoint_problem(path, flagscale_files=False)
        if problem:
            raise CheckpointError(f"Checkpoint {path} is incomplete: {problem}. Load another "
                                  f"checkpoint (an older iter_ directory beside it) or restore "
                                  f"that file.")
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"{path} is not a checkpoint: no metadata.json in it and no "
                          f"complete iter_ directory under it. Give an iter_XXXXXXX directory, a "
                          f"checkpoints/ directory or a run directory.")

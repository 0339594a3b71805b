"""Outputs of the commands that write them (``convert``, ``reshard``, ``preprocess``): never on
top of their input, a training run or a checkpoint, only ever replacing an earlier output of the
same command, and appearing complete or not at all.

    with atomic_output_dir(out, overwrite, command="reshard", inputs=[src]) as tmp:
        ...                                   # write into tmp; renamed to out when the block ends

:func:`check_output_location` refuses an output that equals, contains or lies inside an input, a
run directory (``config.yaml`` + ``checkpoints/``, or ``metrics.jsonl``) or a checkpoint (an
``iter_XXXXXXX`` directory, one holding ``metadata.json``, or a ``checkpoints/`` directory whose
``latest`` file names one). A directory output carries the marker file :data:`MARKER` naming
the command that wrote it; ``--overwrite`` replaces only a directory whose marker names the same
command, so no flag can make a command delete something it did not write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from flagscale.errors import OutputError

MARKER = ".flagscale-output.json"
"""Written into every directory output: ``{"command": ..., "inputs": [...]}``."""

_ITER = re.compile(r"^iter_\d{7}(\.partial)?$")


def protected_kind(path: Path) -> Optional[str]:
    """What ``path`` is if it must never be written into or replaced: ``"run directory"``,
    ``"checkpoint"``, or None."""
    if not path.is_dir():
        return None
    if ((path / "config.yaml").is_file() and (path / "checkpoints").is_dir()) \
            or (path / "metrics.jsonl").is_file():
        return "run directory"
    if _ITER.match(path.name) or (path / "metadata.json").is_file() or _names_checkpoint(path):
        return "checkpoint"
    return None


def _names_checkpoint(path: Path) -> bool:
    """``path`` is a ``checkpoints/`` directory: its ``latest`` file names a directory in it."""
    try:
        name = (path / "latest").read_text(errors="replace").strip()
    except OSError:
        return False
    return bool(name) and "/" not in name and (path / name).is_dir()


def _overlap(output: Path, path: Path) -> bool:
    return output == path or path in output.parents or output in path.parents


def read_marker(directory: Path) -> Optional[dict]:
    """The marker of an earlier output in ``directory``, or None when it has none."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(directory: Path, command: str, inputs: Iterable[str | os.PathLike]) -> None:
    """Mark ``directory`` as the output of ``flagscale <command>`` from ``inputs``."""
    (Path(directory) / MARKER).write_text(json.dumps(
        {"command": command, "inputs": [str(Path(p).resolve()) for p in inputs]}, indent=1) + "\n")


def check_output_location(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                          flag: str = "--output") -> None:
    """Refuse ``output`` (a directory or a file) when it equals, contains or lies inside one of
    ``inputs``, a run directory or a checkpoint."""
    out = Path(output).resolve()
    for given in inputs:
        path = Path(given).resolve()
        if _overlap(out, path):
            raise OutputError(
                f"{flag} {output} overlaps --input {given} ({out} vs {path}): the input is only "
                f"ever read, and an output there would replace it or mix with it. Choose a "
                f"{flag} apart from the input, neither inside it nor holding it.")
    for path in (out, *out.parents):
        kind = protected_kind(path)
        # An earlier output of a command (a resharded or imported checkpoint) may itself be
        # replaced; whether this command may do so is the marker's business.
        if kind and not (path == out and kind == "checkpoint" and read_marker(out)):
            where = "is" if path == out else f"lies inside {path}, which is"
            raise OutputError(
                f"{flag} {output} {where} a {kind}: flagscale never writes a command's output "
                f"into a training run or a checkpoint, where it would replace or mix with what "
                f"the run wrote. Choose a {flag} outside {path}.")
    if out.is_dir():
        for root, dirs, _ in os.walk(out):
            for name in dirs:
                kind = protected_kind(Path(root) / name)
                if kind:
                    raise OutputError(
                        f"{flag} {output} contains the {kind} {Path(root) / name}, which "
                        f"replacing it would delete. Choose another {flag}.")


def check_output(output: str | os.PathLike, overwrite: bool, command: str) -> None:
    """Refuse an existing ``output`` unless it is empty, or ``overwrite`` is given and its
    marker says ``flagscale <command>`` wrote it."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"Output {output} exists and is not a directory. Choose another "
                          f"--output.")
    if not output.is_dir() or not any(output.iterdir()):
        return
    marker = read_marker(output)
    if marker is None or marker.get("command") != command:
        writer = (f"`flagscale {marker.get('command')}` wrote it" if marker
                  else f"it has no {MARKER}, so no `flagscale {command}` wrote it")
        raise OutputError(f"Output directory {output} is not empty and {writer}: flagscale "
                          f"{command} replaces only its own earlier output, --overwrite or not. "
                          f"Choose another --output, or remove {output} yourself if it is "
                          f"disposable.")
    if not overwrite:
        raise OutputError(f"Output directory {output} is not empty (an earlier `flagscale "
                          f"{command}` output). Pass --overwrite to replace it once the new "
                          f"output is complete, or choose another --output.")


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool, *, command: str,
                      inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Check ``output`` (:func:`check_output_location`, :func:`check_output`), then yield a
    temporary sibling that replaces it, marked as ``command``'s output, only if the block
    succeeds; on failure the temporary directory is removed and ``output`` is untouched."""
    output, inputs = Path(output), list(inputs)
    check_output_location(output, inputs)
    check_output(output, overwrite, command)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
    try:
        yield tmp
        write_marker(tmp, command, inputs)
        if output.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, stale / output.name)
            os.replace(tmp, output)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

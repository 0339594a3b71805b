"""Output directories that appear complete or not at all (checkpoints, resharded checkpoints,
Hugging Face exports): written under a temporary sibling name and renamed when done."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from flagscale.errors import FlagScaleError


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output unless ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise FlagScaleError(f"Output {output} exists and is not a directory. Choose another "
                             f"--output.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FlagScaleError(f"Output directory {output} is not empty. Pass --overwrite to "
                             f"replace it, or choose another --output.")


@contextlib.contextmanager
def atomic_output_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` that replaces it only if the block succeeds; on
    failure the temporary directory is removed and ``output`` is untouched."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would outlive the rename
    try:
        yield tmp
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

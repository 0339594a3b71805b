"""Dataset fingerprints: what a run trained on, so that resuming it or tracing it on data that
changed since (a dataset rebuilt under the same prefix, a source edited and re-preprocessed) is
refused with what changed, instead of reading other samples than the run did.

The fingerprint of a prefix is the sha256 of ``PREFIX.idx`` (document and sequence boundaries:
any rebuild that moves one changes it), the size of ``PREFIX.bin``, and, where the provenance
sidecar exists, its source files with their sha256 at build time. A run records the fingerprints
of its ``data.paths`` in ``run.dir/data_fingerprint.json`` and in every checkpoint, and keys its
dataset index cache by them (:func:`data_cache_dir`), so a rebuilt dataset never meets a stale
cache.

    fingerprints = fingerprint_data(cfg)            # {prefix: {"idx_sha256", "bin_bytes", ...}}
    check_data_unchanged(recorded, fingerprints, "Resuming from ...", "Restore ...")
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from flagscale.config import Config, data_prefixes
from flagscale.data.provenance import prov_paths
from flagscale.data.tokenizer import file_sha256
from flagscale.errors import DataError

RUN_FILE = "data_fingerprint.json"
"""Where a run records the fingerprints of the data it trains on, under ``run.dir``."""


def dataset_fingerprint(prefix: str) -> dict:
    """``{"idx_sha256", "bin_bytes"}`` of dataset ``prefix``, plus ``"sources"`` (path ->
    sha256 at build time) when it has a provenance sidecar."""
    try:
        fingerprint = {"idx_sha256": file_sha256(prefix + ".idx"),
                       "bin_bytes": Path(prefix + ".bin").stat().st_size}
        _, meta = prov_paths(prefix)
        if meta.is_file():
            sources = json.loads(meta.read_text(encoding="utf-8"))["sources"]
            fingerprint["sources"] = {s["path"]: s["sha256"] for s in sources}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"Cannot fingerprint dataset {prefix} ({exc}). Check data.paths, or "
                        f"rebuild it with `flagscale preprocess --output-prefix {prefix} ...`.") \
            from None
    return fingerprint


def fingerprint_data(cfg: Config) -> dict[str, dict]:
    """The fingerprint of every prefix of ``data.paths``."""
    return {prefix: dataset_fingerprint(prefix) for _, prefix in data_prefixes(cfg)}


def shared_fingerprints(cfg: Config) -> dict[str, dict]:
    """Collective: :func:`fingerprint_data` read on global rank 0 and sent to every rank, so
    each ``.idx`` is hashed once per run, not once per process."""
    import torch.distributed as dist

    box = [fingerprint_data(cfg) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_changes(recorded: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """What differs between two fingerprints, one entry per changed file, for the prefixes both
    hold (a prefix added to or dropped from ``data.paths`` is a config change, not a data one)."""
    changes = []
    for prefix in sorted(recorded.keys() & current.keys()):
        old, new = recorded[prefix], current[prefix]
        if old.get("idx_sha256") != new.get("idx_sha256"):
            changes.append(f"{prefix}.idx: sha256 {str(old.get('idx_sha256'))[:12]} -> "
                           f"{str(new.get('idx_sha256'))[:12]} (the dataset was rebuilt)")
        if old.get("bin_bytes") != new.get("bin_bytes"):
            changes.append(f"{prefix}.bin: {old.get('bin_bytes')} -> {new.get('bin_bytes')} "
                           f"bytes")
        old_sources, new_sources = old.get("sources") or {}, new.get("sources") or {}
        for path in sorted(old_sources.keys() | new_sources.keys()):
            before, after = old_sources.get(path), new_sources.get(path)
            if before != after:
                what = ("added" if before is None else "removed" if after is None else
                        f"sha256 {before[:12]} -> {after[:12]}")
                changes.append(f"{prefix}: source {path} {what}")
    return changes


def check_data_unchanged(recorded: Optional[dict], current: dict, what: str, fix: str) -> None:
    """DataError "``what``: the data changed ... ``fix``" naming each change; nothing when
    ``recorded`` is empty or None (a run from before fingerprints)."""
    changes = data_changes(recorded or {}, current)
    if changes:
        raise DataError(f"{what}: its data changed since the run read it: {'; '.join(changes)}. "
                        f"{fix}")


def data_cache_dir(run_dir: Path, fingerprints: dict) -> Path:
    """``run_dir/data_cache/<key>``: megatron-core names its index caches after the dataset
    config (paths, seed, sizes), not the data, so the key is what keeps a rebuilt dataset from
    reading the cache of the old one."""
    key = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
    return Path(run_dir) / "data_cache" / key


def write_run_fingerprints(run_dir: Path, fingerprints: dict) -> Path:
    """Record ``fingerprints`` in ``run_dir`` (atomic replace); returns the file."""
    path = Path(run_dir) / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.tmp")
    tmp.write_text(json.dumps(fingerprints, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_run_fingerprints(run_dir: Path) -> Optional[dict]:
    """What :func:`write_run_fingerprints` recorded in ``run_dir``, or None when nothing was."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is unreadable ({exc}). Delete it to skip the check that the "
                        f"data is the one the run read.") from None

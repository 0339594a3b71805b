"""A real saved run shared by the checkpoint-integrity tests: copy it before damaging it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.dist import run_cli, tiny_config


def run_config(path: Path, corpus: str, tokenizer: str, run_dir: Path, **sections) -> Path:
    """Write a 2-process (dp=2) tiny-model config that saves every iteration and resumes with
    ``checkpoint.load=auto``; ``sections`` update its sections."""
    base = {"parallel": {"dp": 2},
            "train": {"seq_length": 64, "iterations": 2, "lr": 2e-3, "min_lr": 2e-4,
                      "warmup_iterations": 1},
            "checkpoint": {"save_interval": 1, "load": "auto"}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_config(path, corpus, tokenizer, run_dir, **base)


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory, tiny_corpus, tiny_tokenizer) -> Path:
    """The run directory of a finished run that saved iterations 1 and 2."""
    tmp = tmp_path_factory.mktemp("saved")
    run_cli("train", run_config(tmp / "config.yaml", tiny_corpus, tiny_tokenizer, tmp / "run"))
    assert (tmp / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    return tmp / "run"


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    """A private copy of :func:`saved_run` to damage."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))

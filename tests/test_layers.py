"""The package's layers (``[tool.importlinter]`` in pyproject.toml) hold, and ``lint-imports``
really fails when a module imports upward or a sibling it must not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


@pytest.mark.parametrize("module, source, message", [
    # config sits below train: an upward import.
    ("config/upward.py", "import flagscale.train.setup\n",
     "flagscale.config is not allowed to import flagscale.train"),
    # plan and launch share a layer as independent features.
    ("launch/sideways.py", "from flagscale.plan import plan_layouts\n",
     "flagscale.launch is not allowed to import flagscale.plan"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, source, message):
    shutil.copytree(ROOT / "flagscale", tmp_path / "flagscale",
                    ignore=shutil.ignore_patterns("__pycache__", "corpus"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "flagscale" / module).write_text(source)
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout

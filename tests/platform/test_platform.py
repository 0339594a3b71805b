"""The platform layer: the CPU backend is chosen on a machine without GPUs, says so, and cannot be
forced onto CUDA by mistake (or CUDA requested where there is none)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only machine behaviour")
def test_auto_selects_cpu_with_gloo_and_redirects_megatron_cuda_calls():
    proc = _python(
        "from flagscale.platform import setup_platform\n"
        "import torch\n"
        "p = setup_platform('auto')\n"
        "print(p.describe())\n"
        "print(torch.zeros(2, device='cuda').device, torch.cuda.current_device())\n"
        "print(torch.ones(1).type())\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("platform cpu: device cpu, backend gloo")
    assert "megatron-core local layer spec" in lines[0]
    assert lines[1] == "cpu cpu"
    # The distributed optimizer's dtype checks compare against CUDA type names.
    assert lines[2] == "torch.cuda.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_cuda_requested_without_gpu_is_a_clear_error():
    proc = _python("from flagscale.platform import setup_platform\nsetup_platform('cuda')")
    assert proc.returncode != 0
    assert "platform=cuda but torch sees no GPU" in proc.stderr

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


def test_megatron_core_fixes_are_applied_by_setup_platform_on_the_pinned_source():
    proc = _python(
        "from flagscale.platform import setup_platform\n"
        "from flagscale.platform.megatron_patches import PATCHES, source_sha256\n"
        "from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D\n"
        "setup_platform('auto')\n"
        "for patch in PATCHES:\n"
        "    current = getattr(D, patch.attribute)\n"
        "    print(patch.name, current.__name__, current._flagscale_original is patch.check(),\n"
        "          source_sha256(current._flagscale_original) == patch.source_sha256)\n"
        "setup_platform('auto'); PATCHES[0].apply()\n"
        "print(getattr(D, PATCHES[0].attribute)._flagscale_original.__qualname__)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "fully_reshardable_load_keyerror_step _set_main_param_and_optimizer_states True True",
        "shared_adam_step_after_load load_state_dict True True",
        # Applied twice, the fix still wraps megatron-core's own function, not itself.
        "DistributedOptimizer._set_main_param_and_optimizer_states"]


def test_a_fix_refuses_another_megatron_core_version():
    from flagscale.errors import PlatformError
    from flagscale.platform.megatron_patches import PATCHES, installed_megatron_core

    installed = installed_megatron_core()
    with pytest.raises(PlatformError, match=rf"megatron-core {installed} is installed, but "
                                            rf"flagscale's fix 'fully_reshardable_load_keyerror_"
                                            rf"step' .* was written for megatron-core 0\.15\.0"):
        PATCHES[0].check(pinned="0.15.0")


def test_a_fix_refuses_source_it_was_not_written_for():
    from flagscale.errors import PlatformError
    from flagscale.platform.megatron_patches import PATCHES, source_sha256

    actual = source_sha256(PATCHES[1].target())
    with pytest.raises(PlatformError, match=rf"DistributedOptimizer\.load_state_dict in the "
                                            rf"installed megatron-core 0\.16\.1 is not the code .*"
                                            rf"record its hash {actual}"):
        PATCHES[1].check(expected_sha256="0" * 64)


def test_importing_flagscale_is_light_and_leaves_warning_filters_alone():
    proc = _python(
        "import sys, warnings\n"
        "before = list(warnings.filters)\n"
        "import flagscale, flagscale.config, flagscale.platform, flagscale.cli.main\n"
        "print(warnings.filters == before, 'torch' in sys.modules)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]

"""Optional kernel libraries are imported for real: an absent one and a broken one are told apart
and named, and settings that need Transformer Engine are refused up front with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _probe(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``tmp_path`` (holding fake, really importable packages) on sys.path."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
                           + code], capture_output=True, text=True, timeout=120)


def test_absent_and_broken_libraries_are_named_with_the_import_error(tmp_path):
    # A Transformer Engine whose import fails (e.g. built for another CUDA), and an apex without
    # its CUDA extensions: find_spec would call both available.
    te = tmp_path / "transformer_engine"
    te.mkdir()
    (te / "__init__.py").write_text("")
    (te / "pytorch.py").write_text("raise OSError('libcudart.so.12: cannot open shared object')")
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")
    proc = _probe(tmp_path, "from flagscale.platform.kernels import probe_kernels\n"
                            "for s in probe_kernels().values(): print(s.describe())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "transformer_engine: broken: OSError: libcudart.so.12: cannot open shared object",
        "apex: available",
        "fused_wgrad: not installed"]


def test_a_missing_dependency_inside_a_library_is_broken_not_absent(tmp_path):
    te = tmp_path / "transformer_engine"
    te.mkdir()
    (te / "__init__.py").write_text("")
    (te / "pytorch.py").write_text("import transformer_engine_torch")
    proc = _probe(tmp_path, "from flagscale.platform.kernels import probe_kernel\n"
                            "print(probe_kernel('transformer_engine').describe())")
    assert proc.stdout.strip() == ("transformer_engine: broken: ModuleNotFoundError: No module "
                                   "named 'transformer_engine_torch'")


def test_the_startup_line_names_missing_kernels_and_the_attention_in_use():
    from flagscale.platform import Platform

    plat = Platform("cuda", torch.device("cpu"), "nccl", False, True, False,
                    ("transformer_engine: not installed", "fused_wgrad: not installed"))
    line = plat.describe()
    assert "optional kernels: apex" in line
    assert "unavailable: transformer_engine: not installed; fused_wgrad: not installed" in line
    assert "attention: torch scaled_dot_product_attention" in line


def test_transformer_engine_settings_are_refused_with_the_reason():
    from flagscale.errors import PlatformError
    from flagscale.platform import Platform, require_transformer_engine

    broken = Platform("cuda", torch.device("cpu"), "nccl", False, False, False,
                      ("transformer_engine: broken: OSError: libcudart.so.12",))
    with pytest.raises(PlatformError, match=r"parallel.cp=2 .*: needs Transformer Engine, but "
                                            r"transformer_engine: broken: OSError: libcudart"):
        broken.require_transformer_engine(["parallel.cp=2 (context-parallel attention)"])
    broken.require_transformer_engine([])  # nothing asked, nothing refused
    if not torch.cuda.is_available():
        with pytest.raises(PlatformError, match=r"model.fp8=hybrid .* the cpu platform has none"):
            require_transformer_engine(["model.fp8=hybrid (FP8 GEMMs)"], "auto")

"""Peak dense tensor-core throughput per device and precision, and detection of the device.

MFU divides achieved model TFLOP/s by these figures. NVIDIA datasheets print tensor-core peaks
"with sparsity" (2:4 structured); dense training runs at half of that, which is what is stored here.
A device or precision missing from the table gives no peak at all: falling back to another device's
figure is how frameworks ended up printing MFU above 100%.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from flagscale.errors import ConfigError

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 1,979 / FP8 3,958 TFLOPS with
    # sparsity (https://www.nvidia.com/en-us/data-center/h100/).
    "h100-sxm": {"bf16": 989.0, "fp8": 1979.0},
    # Same datasheet, H100 NVL column: BF16 1,671 / FP8 3,341 TFLOPS with sparsity.
    "h100-nvl": {"bf16": 835.0, "fp8": 1670.0},
    # Same datasheet, H100 PCIe column: BF16 1,513 / FP8 3,026 TFLOPS with sparsity.
    "h100-pcie": {"bf16": 756.0, "fp8": 1513.0},
    # NVIDIA H200 datasheet, H200 SXM column: BF16 1,979 / FP8 3,958 TFLOPS with sparsity
    # (https://www.nvidia.com/en-us/data-center/h200/); same compute die as the H100 SXM.
    "h200": {"bf16": 989.0, "fp8": 1979.0},
    # NVIDIA H800 SXM5 datasheet (China export variant of the H100 SXM: reduced NVLink bandwidth,
    # same tensor cores): BF16 1,979 / FP8 3,958 TFLOPS with sparsity.
    "h800": {"bf16": 989.0, "fp8": 1979.0},
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity), SXM and
    # PCIe alike (https://www.nvidia.com/en-us/data-center/a100/). No FP8 tensor cores.
    "a100": {"bf16": 312.0},
    # NVIDIA A800 datasheet (China export variant of the A100: reduced NVLink bandwidth, same
    # tensor cores): BF16 312 TFLOPS dense.
    "a800": {"bf16": 312.0},
}
"""Peak dense TFLOP/s per device key and precision (``bf16``, ``fp8``)."""

# fp16 runs on the same tensor-core paths at the same rate as bf16 on every device above. fp32
# training has no entry: whether its matmuls use TF32 depends on torch settings, so its peak is a
# guess the user has to make explicitly (metrics.peak_tflops).
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16", "float16": "bf16",
                  "fp8": "fp8"}


def canonical_device(name: Optional[str]) -> Optional[str]:
    """Map a device key (``h100-sxm``) or a driver name (``NVIDIA H100 80GB HBM3``) to a table key.

    Returns None for anything not in the table (including variants such as H100 PCIe vs SXM that
    cannot be told apart from the name): an unknown device has no peak.
    """
    if not name:
        return None
    if name.lower() in PEAK_TFLOPS:
        return name.lower()
    text = re.sub(r"[^a-z0-9]+", " ", name.lower())
    words = set(text.split())
    for chip in ("h100", "h200", "h800", "a100", "a800"):
        if not re.search(rf"\b{chip}(?!\d)", text):  # not the RTX A1000's "a100"
            continue
        variant = "nvl" if "nvl" in words else "pcie" if "pcie" in words else "sxm"
        if chip == "h100":
            return f"h100-{variant}"
        if chip in ("a100", "a800"):
            return chip  # SXM and PCIe boards share one tensor-core peak.
        # Only the SXM forms of the others are in the table (H200 NVL and H800 PCIe are slower).
        return chip if variant == "sxm" else None
    return None


def detect_device() -> Optional[str]:
    """The driver's name of this process's GPU, or None without CUDA (a CPU has no table entry)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None


def peak_tflops(device: Optional[str], dtype: str = "bf16") -> Optional[float]:
    """Peak dense TFLOP/s of ``device`` (key or driver name) at ``dtype``; None when unknown."""
    key = canonical_device(device)
    precision = _DTYPE_ALIASES.get(dtype)
    if key is None or precision is None:
        return None
    return PEAK_TFLOPS[key].get(precision)


def resolve_peak(device: Optional[str], dtype: str,
                 override: Optional[float] = None) -> tuple[Optional[str], Optional[float], str]:
    """Decide the device name and peak TFLOP/s a run reports MFU against.

    ``device`` is a configured name (``metrics.device``) or None to detect it; ``override``
    (``metrics.peak_tflops``) wins over the table. Returns ``(device, peak or None, why)`` where
    ``why`` explains a missing peak. A configured device that is not in the table is a
    :class:`ConfigError` (the user asked for something specific); an undetected one is not.
    """
    if override is not None:
        if override <= 0:
            raise ConfigError(f"metrics.peak_tflops must be positive, got {override}.")
        return device or detect_device() or "custom", float(override), ""
    if device is not None and canonical_device(device) is None:
        raise ConfigError(f"metrics.device '{device}' is not in the peak-throughput table (known: "
                          f"{', '.join(PEAK_TFLOPS)}). Use one of those, or set "
                          f"metrics.peak_tflops to the device's dense TFLOP/s.")
    name = device or detect_device()
    peak = peak_tflops(name, dtype)
    if peak is not None:
        return name, peak, ""
    if name is None:
        why = "no GPU detected (CPU run)"
    elif canonical_device(name) is None:
        why = f"device '{name}' is not in the peak-throughput table"
    else:
        why = f"no {dtype} peak for {canonical_device(name)} in the peak-throughput table"
    return name, None, (why + "; give the dense TFLOP/s peak per GPU (metrics.peak_tflops, or "
                        "--peak-tflops of flagscale flops) to report MFU")


def mfu_precision(model) -> str:
    """The precision a run's MFU is measured against: ``fp8`` when its GEMMs run in FP8
    (``model.fp8``; the FP8 peak is twice the bf16 one, so an FP8 run reported against the bf16
    peak would look twice as efficient), else ``model.params_dtype``."""
    return "fp8" if getattr(model, "fp8", None) else model.params_dtype

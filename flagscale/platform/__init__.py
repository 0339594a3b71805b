"""The one place that knows what hardware flagscale runs on, and how megatron-core is adapted to it.

``setup_platform`` picks the backend (``cuda``: NCCL on GPUs; ``cpu``: gloo on CPU processes with
megatron-core's hard-wired CUDA calls redirected), applies flagscale's fixes of megatron-core
defects (:mod:`flagscale.platform.megatron_patches`), and must run before megatron-core builds
anything. Project code takes its device from the returned :class:`Platform` and saves or restores
the accelerator's RNG through :func:`device_rng_state`; outside this package ``torch.cuda`` is only
queried (availability, device name, memory statistics), never configured.

Importing this package does not import torch (the CLI and ``flagscale.config`` stay light).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from flagscale.errors import ConfigError, PlatformError

if TYPE_CHECKING:
    import torch

MEGATRON_NOISE = (
    # Import time: megatron-core warns about every optional kernel library it does not find; the
    # platform line (Platform.describe) already states which kernels are active.
    r".*Apex is not installed.*", r".*Transformer Engine and Apex are not installed.*",
    # Deprecations raised by torch inside megatron-core's own calls (collectives, gradient
    # buffers, its checkpoint code), nothing a flagscale user can act on.
    r".*full scope is deprecated.*",
    r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
    r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
    r".*deprecating ShardedTensor.*", r".*`load_state_dict` is deprecated.*",
    r".*torch\.distributed is disabled, unavailable or uninitialized.*",
)
"""Messages of warnings megatron-core (or torch inside it) raises that tell the user nothing to
do; muted only inside :func:`megatron_quiet`."""


@contextlib.contextmanager
def megatron_quiet() -> Iterator[None]:
    """Mute :data:`MEGATRON_NOISE` for the calls inside the block; other warnings and code
    outside the block are untouched."""
    with warnings.catch_warnings():
        for message in MEGATRON_NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


@dataclass(frozen=True)
class Platform:
    """The active backend."""

    kind: str
    """``cuda`` or ``cpu``."""
    device: "torch.device"
    """Device of this process's tensors."""
    backend: str
    """torch.distributed backend (``nccl`` or ``gloo``)."""
    transformer_engine: bool
    """Transformer Engine layer spec in use (``transformer_engine.pytorch`` imports)."""
    apex: bool
    """apex fused kernels importable."""
    fused_wgrad: bool = False
    """``fused_weight_gradient_mlp_cuda`` importable: megatron-core's gradient-accumulation
    fusion can run."""
    missing_kernels: tuple[str, ...] = ()
    """``name: reason`` of each optional kernel library that is absent or broken (cuda only)."""

    def describe(self) -> str:
        kernels = [n for n, on in (("transformer_engine", self.transformer_engine),
                                   ("apex", self.apex), ("fused_wgrad", self.fused_wgrad)) if on]
        # What flagscale.models' layer_spec picks for this platform.
        attention = ("Transformer Engine" if self.transformer_engine else
                     "torch scaled_dot_product_attention (megatron-core local layer spec)"
                     if self.kind == "cuda" else "megatron-core DotProductAttention (local spec)")
        missing = f"; unavailable: {'; '.join(self.missing_kernels)}" if self.missing_kernels else ""
        return (f"platform {self.kind}: device {self.device}, backend {self.backend}, optional "
                f"kernels: {', '.join(kernels) or 'none (megatron-core local layer spec)'}"
                f"{missing}; attention: {attention}")

    def require_transformer_engine(self, features: list[str]) -> None:
        """Refuse ``features`` (settings only Transformer Engine implements) when it is not in
        use here, naming why (PlatformError)."""
        if not features or self.transformer_engine:
            return
        why = next((note for note in self.missing_kernels
                    if note.startswith("transformer_engine")), "it is not in use")
        raise _te_refusal(features, why if self.kind == "cuda" else _no_te_on(self.kind))


def _no_te_on(kind: str) -> str:
    return f"the {kind} platform has none (Transformer Engine runs on NVIDIA GPUs only)"


def _te_refusal(features: list[str], why: str) -> PlatformError:
    return PlatformError(f"{'; '.join(features)}: needs Transformer Engine, but {why}. Install a "
                         f"Transformer Engine built for this torch and CUDA (pip install "
                         f"transformer_engine[pytorch]) on a GPU machine, or turn the setting "
                         f"off.")


def require_transformer_engine(features: list[str], name: str = "auto") -> None:
    """Refuse, before any process starts, ``features`` (settings only Transformer Engine
    implements) where platform ``name`` would run without it: the active platform's answer, or,
    in a launcher that has not set one up, the same decision made without binding a GPU."""
    if not features:
        return
    if _ACTIVE is not None:
        _ACTIVE.require_transformer_engine(features)
        return
    import torch

    from flagscale.platform.kernels import probe_kernel

    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if kind != "cuda":
        raise _te_refusal(features, _no_te_on(kind))
    status = probe_kernel("transformer_engine")
    if not status.available:
        raise _te_refusal(features, status.describe())


_ACTIVE: Platform | None = None


def setup_platform(name: str = "auto") -> Platform:
    """Activate the ``auto``/``cuda``/``cpu`` backend for this process and apply the
    megatron-core fixes (idempotent)."""
    import torch

    global _ACTIVE
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if _ACTIVE is not None:
        if _ACTIVE.kind != kind:
            raise ConfigError(f"platform {kind} requested but {_ACTIVE.kind} is already active "
                              f"in this process.")
        return _ACTIVE
    if kind not in ("cuda", "cpu"):
        raise ConfigError(f"platform={name!r} is not one of auto, cuda, cpu.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("platform=cuda but torch sees no GPU (torch.cuda.is_available() is "
                          "False). Use platform=cpu or auto, or check CUDA_VISIBLE_DEVICES.")
    if kind == "cpu" and torch.cuda.is_available():
        raise ConfigError("platform=cpu on a machine with a visible GPU: flagscale refuses to "
                          "redirect CUDA calls there. Use platform=cuda (or auto), or hide "
                          "the GPUs with CUDA_VISIBLE_DEVICES=''.")
    from flagscale.platform.megatron_patches import apply_patches

    # The first imports of megatron-core modules warn about missing kernel libraries (see
    # MEGATRON_NOISE); they all happen here, muted, so no later import repeats them.
    with megatron_quiet():
        if kind == "cuda":
            from flagscale.platform import cuda
            device = cuda.install()
            kernels = cuda.optional_kernels()
            platform = Platform("cuda", device, "nccl", kernels["transformer_engine"].available,
                                kernels["apex"].available, kernels["fused_wgrad"].available,
                                tuple(k.describe() for k in kernels.values() if not k.available))
        else:
            from flagscale.platform import cpu
            cpu.install()
            platform = Platform("cpu", torch.device("cpu"), "gloo", False, False)
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.optimizer  # noqa: F401
        apply_patches()
    _ACTIVE = platform
    return _ACTIVE


def active_platform() -> Platform:
    """The platform set up in this process (sets up ``auto`` when none was)."""
    return _ACTIVE or setup_platform("auto")


def device_rng_state() -> Optional["torch.Tensor"]:
    """The GPU's RNG state, or None where there is no GPU (on the CPU platform megatron-core's
    CUDA RNG calls are redirected to the CPU generator, saved with the CPU state)."""
    import torch

    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_device_rng_state(state: Optional["torch.Tensor"]) -> None:
    """Restore a state from :func:`device_rng_state` (nothing to do without a GPU or a state)."""
    import torch

    if state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state)


@contextlib.contextmanager
def world_of_one(platform: Platform | None = None):
    """A one-process torch.distributed group for single-process tools (conversion, tracing)
    that call into megatron-core code asking for ranks; reuses a group that already exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    platform = platform or active_platform()
    dist.init_process_group(platform.backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": platform.device} if platform.kind == "cuda" else {}))
    try:
        yield
    finally:
        dist.destroy_process_group()

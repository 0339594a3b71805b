"""Small, isolated fixes of megatron-core 0.16.1 defects, each named after the defect it mends.

:func:`apply_patches` (called by ``setup_platform``, before megatron-core builds anything) applies
each one after checking that it was written for the code it replaces: the installed megatron-core
must be the pinned version, and the ``inspect.getsource`` text of the function it replaces must
hash to the value recorded here. Anything else refuses to start with a :class:`PlatformError`
rather than stacking a fix on code it was not written for. To move to another megatron-core,
check whether each defect still exists there, then update the pin and the hashes (the error
message prints the installed source's hash).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from flagscale.errors import PlatformError

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release every patch was written for (pyproject.toml pins the same)."""


def source_sha256(function: Callable) -> str:
    """sha256 of a function's source text, as ``inspect.getsource`` returns it."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def installed_megatron_core() -> Optional[str]:
    """The installed megatron-core version, or None when it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Patch:
    """One fix: ``owner.attribute`` (a method of a megatron-core class) replaced by
    ``build(original)``, applied only on the source it was written for."""

    name: str
    """The defect, as a phrase (the function implementing the fix has the same name)."""
    module: str
    owner: str
    attribute: str
    source_sha256: str
    """sha256 of the replaced function's ``inspect.getsource`` text in the pinned release."""
    build: Callable[[Callable], Callable]

    def target(self) -> Callable:
        """The function the fix replaces (the original, also after the fix is applied)."""
        current = getattr(getattr(importlib.import_module(self.module), self.owner),
                          self.attribute)
        return getattr(current, "_flagscale_original", current)

    def check(self, version: Optional[str] = None, pinned: str = MEGATRON_CORE_VERSION,
              expected_sha256: Optional[str] = None) -> Callable:
        """Return the original function if the fix applies to it, else raise PlatformError.

        ``version`` defaults to the installed megatron-core's, ``expected_sha256`` to the one
        recorded for the pinned release.
        """
        version = installed_megatron_core() if version is None else version
        where = f"{self.module}.{self.owner}.{self.attribute}"
        if version != pinned:
            raise PlatformError(
                f"megatron-core {version} is installed, but flagscale's fix '{self.name}' of "
                f"{where} was written for megatron-core {pinned}. Install megatron-core=={pinned} "
                f"(pip install 'megatron-core=={pinned}'), or check that the defect still exists "
                f"in {version} and update flagscale/platform/megatron_patches.py.")
        original = self.target()
        actual = source_sha256(original)
        expected = expected_sha256 or self.source_sha256
        if actual != expected:
            raise PlatformError(
                f"{where} in the installed megatron-core {version} is not the code flagscale's "
                f"fix '{self.name}' was written for (source sha256 {actual[:16]}..., expected "
                f"{expected[:16]}... from megatron-core {pinned}): the installed package was "
                f"modified. Reinstall megatron-core=={pinned}, or re-check the defect against this "
                f"source and record its hash {actual} in flagscale/platform/megatron_patches.py.")
        return original

    def apply(self, **check_args) -> None:
        """Check (see :meth:`check`), then replace the function (idempotent)."""
        original = self.check(**check_args)
        owner = getattr(importlib.import_module(self.module), self.owner)
        if getattr(getattr(owner, self.attribute), "_flagscale_original", None) is original:
            return
        replacement = self.build(original)
        replacement._flagscale_original = original
        setattr(owner, self.attribute, replacement)


def fully_reshardable_load_keyerror_step(original: Callable) -> Callable:
    """KeyError 'step' when loading a ``fully_reshardable`` distributed-optimizer checkpoint
    with torch's Adam (no apex, no Transformer Engine).

    torch's Adam keeps a per-parameter ``step`` tensor; ``_set_main_param_and_optimizer_states``
    copies every key of the destination state from a source dict holding only ``param``,
    ``exp_avg`` and ``exp_avg_sq``. The step itself is restored from the param groups by
    ``load_state_dict``, so copying every destination key but ``step`` is exactly right (a
    ``dp_reshardable`` source also carries a stale placeholder ``step`` and a ``padding`` flag,
    which must not be copied either). The copy runs under ``no_grad``: with fp32 parameters the
    main parameter is a view of a leaf that requires grad, and the ``dp_reshardable`` load path,
    unlike the ``fully_reshardable`` one, is not wrapped in ``no_grad``.
    """
    import torch

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key in destination.keys() - {"step"}:
                destination[key].copy_(tensors[key])

    return _set_main_param_and_optimizer_states


def shared_adam_step_after_load(original: Callable) -> Callable:
    """Adam's bias correction goes wrong after loading a distributed-optimizer checkpoint with
    torch's Adam (no apex, no Transformer Engine).

    ``DistributedOptimizer.load_state_dict`` gives every parameter's state the *same* ``step``
    tensor; torch's Adam increments each parameter's step in place, so after a resume the shared
    counter advances once per parameter per iteration and the update differs from an
    uninterrupted run. Giving each parameter its own copy restores the exact update.
    """
    import torch

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()

    return load_state_dict


_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer"

PATCHES = (
    Patch("fully_reshardable_load_keyerror_step", _DISTRIB_OPTIMIZER, "DistributedOptimizer",
          "_set_main_param_and_optimizer_states",
          "93c254228283b2df0147fe436a2fe5d9e754ab4b7276a96f023be179c737329f",
          fully_reshardable_load_keyerror_step),
    Patch("shared_adam_step_after_load", _DISTRIB_OPTIMIZER, "DistributedOptimizer",
          "load_state_dict",
          "15f257b4c4f9a7ef6d6660e829de088d39997615c2a4e52ec5e7e1306b465f04",
          shared_adam_step_after_load),
)
"""Every megatron-core fix, in the order they are applied."""


def apply_patches() -> None:
    """Apply every fix in :data:`PATCHES` (idempotent); PlatformError when one does not fit the
    installed megatron-core."""
    for patch in PATCHES:
        patch.apply()

"""Small, isolated fixes of megatron-core 0.16.1 defects, each named after the defect it mends.

Applied once by :func:`apply_all` before any checkpoint is loaded; each fix checks that the code it
wraps still has the defect's shape, so upgrading megatron-core cannot silently stack fixes.
"""

from __future__ import annotations

import torch

_APPLIED = False


def fix_fully_reshardable_load_keyerror_step() -> None:
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
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_flagscale_fix", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key in destination.keys() - {"step"}:
                destination[key].copy_(tensors[key])

    _set_main_param_and_optimizer_states._flagscale_fix = True
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def fix_shared_adam_step_after_load() -> None:
    """Adam's bias correction goes wrong after loading a distributed-optimizer checkpoint with
    torch's Adam (no apex, no Transformer Engine).

    ``DistributedOptimizer.load_state_dict`` gives every parameter's state the *same* ``step``
    tensor; torch's Adam increments each parameter's step in place, so after a resume the shared
    counter advances once per parameter per iteration and the update differs from an
    uninterrupted run. Giving each parameter its own copy restores the exact update.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict
    if getattr(original, "_flagscale_fix", False):
        return

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()

    load_state_dict._flagscale_fix = True
    DistributedOptimizer.load_state_dict = load_state_dict


def apply_all() -> None:
    """Apply every fix (idempotent)."""
    global _APPLIED
    if not _APPLIED:
        fix_fully_reshardable_load_keyerror_step()
        fix_shared_adam_step_after_load()
        _APPLIED = True

"""The step summary: the per-step values every rank needs summed over the world, in one
all-reduce and one host read per step.

Each step the trainer adds its loss (sum, tokens) and every callback adds what it decides on (the
stop callback which stop signals this rank received, the spike callback every row's loss); the
summary concatenates them into one float64 vector, all-reduces it once (SUM over the world) and
reads it to the host once. A collective's latency and a host sync cost the same for 3 values as
for 3,000, and every rank then decides from the same numbers, so no rank can leave a collective
that another one enters.

Every rank must add the same names with the same sizes in the same order (zeros where it holds
nothing): the slots are positions in one vector.
"""

from __future__ import annotations

import torch


class StepSummary:
    """One step's slots, added on every rank, then summed over the world by :meth:`reduce`."""

    def __init__(self, device):
        self.device = device
        self._slots: dict[str, torch.Tensor] = {}

    def add(self, name: str, values) -> None:
        """Add slot ``name``: a number, a sequence or a tensor (flattened, as float64)."""
        if name in self._slots:
            raise ValueError(f"step summary slot {name!r} added twice in one step")
        self._slots[name] = torch.as_tensor(values, dtype=torch.float64,
                                            device=self.device).reshape(-1)

    def reduce(self) -> dict[str, list[float]]:
        """Collective: every slot summed over the world, as host floats, keyed by name."""
        import torch.distributed as dist

        if not self._slots:
            return {}
        flat = torch.cat(list(self._slots.values()))
        if dist.is_initialized():
            dist.all_reduce(flat)
        values, sums, start = flat.tolist(), {}, 0
        for name, slot in self._slots.items():
            sums[name] = values[start:start + slot.numel()]
            start += slot.numel()
        return sums

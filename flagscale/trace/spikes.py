"""Loss-spike detection for automatic trace reports.

Every step the training loop's spike callback gives :meth:`SpikeDetector.check` the step's loss
(the mean of every row's loss, identical on every rank) and its gradient norm; a reason comes back
when the step deserves a report (:func:`flagscale.trace.reports.write_spike_report`). All ranks
hold the same window, so they take the same decision; the window is part of the callback's state
in every checkpoint, so a resumed run compares against the losses seen before the save.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional



class SpikeDetector:
    """Flags a loss above ``factor`` x the median of the last ``window`` finite losses (once the
    window is full), and non-finite losses or gradient norms when ``on_nan``."""

    def __init__(self, factor: float, window: int, on_nan: bool):
        self.factor = factor
        self.on_nan = on_nan
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, loss: float, grad_norm: Optional[float] = None) -> Optional[str]:
        """Why a step with ``loss`` and ``grad_norm`` is reported (a sentence), or None; then
        remembers the loss."""
        if not math.isfinite(loss):
            return f"loss is {loss}" if self.on_nan else None
        reason = None
        if len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.factor * median:
                reason = (f"loss {loss:.4f} > {self.factor:g} x median {median:.4f} of the last "
                          f"{len(self.recent)} iterations")
        # The median shrugs off the spike itself, so it joins the window like any loss.
        self.recent.append(loss)
        if reason is None and self.on_nan and grad_norm is not None \
                and not math.isfinite(grad_norm):
            # A finite loss whose backward overflowed: this batch broke the weights, and the
            # next step's loss is non-finite whatever its data.
            reason = f"gradient norm is {grad_norm} (loss {loss:.4f})"
        return reason

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        """Refill the window; a smaller ``window`` than the saved one keeps the newest losses."""
        self.recent.clear()
        self.recent.extend(state["recent"])

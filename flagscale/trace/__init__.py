"""Data tracing: which documents (input file, line, byte offset, token span) every row of an
iteration was made of, offline (``flagscale trace``) and automatically at loss spikes.

    for record in trace_iterations(load_config("runs/x/config.yaml"), 7):
        ...
    detector = SpikeDetector(factor, window, on_nan)   # the training loop's spike callback uses it
"""

from flagscale.trace.offline import open_tracer, resolve_dp, trace_iterations
from flagscale.trace.records import Span, Tracer
from flagscale.trace.reports import (add_skipped_batches, recorded_losses, report_path,
                                     write_report, write_spike_report)
from flagscale.trace.spikes import SpikeDetector

__all__ = ["Span", "add_skipped_batches", "SpikeDetector", "Tracer", "open_tracer",
           "recorded_losses", "report_path", "resolve_dp", "trace_iterations", "write_report",
           "write_spike_report"]

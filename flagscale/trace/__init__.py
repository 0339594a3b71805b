"""Data tracing: which documents (input file, line, byte offset, token span) every row of an
iteration was made of, offline (``flagscale trace``) and automatically at loss spikes.

    for record in trace_iterations(load_config("runs/x/config.yaml"), 7):
        ...
    hooks = build_trace_hooks(cfg, layout, run_dir)    # the training loop's spike watcher
"""

from flagscale.trace.offline import open_tracer, resolve_dp, trace_iterations
from flagscale.trace.records import Span, Tracer
from flagscale.trace.reports import recorded_losses, report_path, write_report
from flagscale.trace.spikes import SpikeDetector, TraceReporter, build_trace_hooks

__all__ = ["Span", "SpikeDetector", "TraceReporter", "Tracer", "build_trace_hooks",
           "open_tracer", "recorded_losses", "report_path", "resolve_dp", "trace_iterations",
           "write_report"]

"""``flagscale trace CONFIG --iteration N [--to M] [--format jsonl|text] [key=value ...]``

Names the exact documents every row of iterations N..M read: dataset prefix, document id, source
file, line and byte offset (Parquet: row group and row), the document's token span in the sample
and its decoded text. Datasets without a provenance sidecar (e.g. made by Megatron-LM's
preprocess_data.py) are traced to dataset, document and span; file and line need the sidecar. jsonl
prints one trace record per (row, document); text is for reading.

    flagscale trace runs/tiny/config.yaml --iteration 57            # the run's resolved config
    flagscale trace runs/tiny/config.yaml --iteration 50 --to 60 --format text
    flagscale trace examples/tiny/config.yaml --iteration 7 --dp 2 train.iterations=20

Pass the config and overrides the run was started with (its ``config.yaml`` holds them all): the
sample order depends on the seed, split, sequence length, iterations and data.skip_iterations.
Batches the run skipped on its own at loss spikes (trace.on_spike) come from its latest
checkpoint, so iterations after a rewind are traced to the batches they really read.
The data-parallel size only labels rows (rank, microbatch); it comes from --dp/--nproc, else
parallel.dp, else the run's latest checkpoint. Losses appear where training wrote a trace report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, TextIO

from flagscale.config import ParallelDims, load_config


def run_trace(config: str, iteration: int, to: Optional[int] = None, fmt: str = "jsonl",
              overrides: tuple[str, ...] = (), dp: Optional[int] = None,
              nproc: Optional[int] = None, out: Optional[TextIO] = None) -> int:
    """Print the trace records of iterations ``iteration``..``to`` of ``config`` to ``out``
    (default stdout)."""
    from flagscale.trace import trace_iterations

    out = out or sys.stdout
    cfg = load_config(config, overrides)
    if dp is None and nproc is not None:
        p = cfg.parallel
        dp = ParallelDims.from_world(nproc, tp=p.tp, pp=p.pp, cp=p.cp).dp
    row = None
    try:
        for record in trace_iterations(cfg, iteration, to, dp=dp):
            if fmt == "jsonl":
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            if (record["iteration"], record["global_sample"]) != row:
                row = (record["iteration"], record["global_sample"])
                out.write(_row_heading(record))
            out.write(_document_line(record))
    except BrokenPipeError:
        # `flagscale trace ... | head` read what it wanted: not an error, and no noise at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _row_heading(record: dict) -> str:
    loss = record.get("loss_nonfinite") or record.get("loss")
    loss = "" if loss is None else f"  loss {loss if isinstance(loss, str) else f'{loss:.4f}'}"
    return (f"iteration {record['iteration']}  microbatch {record['microbatch']}  dp_rank "
            f"{record['dp_rank']}  row {record['row']}  sample {record['global_sample']}{loss}\n")


def _document_line(record: dict) -> str:
    if record["source"] is None:
        where = "no provenance sidecar: file and line need one (see `flagscale preprocess`)"
    elif record.get("row_group") is not None:
        where = f"{record['source']} row group {record['row_group']} row {record['row_in_group']}"
    else:
        where = f"{record['source']}:{record['line']} (byte {record['byte_offset']})"
    text = ("" if record["text"] is None
            else "\n      " + json.dumps(record["text"], ensure_ascii=False))
    return (f"  tokens [{record['token_start']}, {record['token_end']})  {record['dataset']} "
            f"document {record['document']} from token {record['doc_offset']}  {where}{text}\n")


def register(subparsers) -> None:
    p = subparsers.add_parser("trace", help="name the documents of training iterations",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="the run's YAML config (RUN_DIR/config.yaml is the resolved one)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides the run was started with")
    p.add_argument("--iteration", type=int, required=True, help="first iteration (1-based)")
    p.add_argument("--to", type=int, default=None, help="last iteration (default: --iteration)")
    p.add_argument("--format", choices=("jsonl", "text"), default="jsonl", dest="fmt",
                   help="jsonl: one record per (row, document); text: for reading")
    p.add_argument("--dp", type=int, default=None, help="the run's data-parallel size")
    p.add_argument("--nproc", type=int, default=None,
                   help="the run's process count (dp = nproc / (tp*pp*cp))")
    p.set_defaults(func=lambda a: run_trace(a.config, a.iteration, a.to, a.fmt,
                                            tuple(a.overrides), a.dp, a.nproc))

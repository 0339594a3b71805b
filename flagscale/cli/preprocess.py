"""``flagscale preprocess``: tokenize text files into a megatron-core indexed dataset.

    flagscale preprocess --input a.jsonl b.txt.gz --output-prefix out/mix --tokenizer tok.model
    flagscale preprocess --input corpus.jsonl --output-prefix out/c --tokenizer hf_dir/ --workers 8
    flagscale preprocess --input corpus.jsonl --output-prefix out/c --tokenizer tok.model --strict
    flagscale preprocess --input fineweb/ 'pile/*.jsonl.zst' --output-prefix out/web --tokenizer hf/

Writes PREFIX.bin/.idx (documents in input order: files as given, lines in order, each ending with
the tokenizer's end-of-document id), the provenance sidecar PREFIX.prov.npy/.prov.json and
PREFIX.rejected.jsonl. Inputs: *.jsonl (one JSON object per line, text under --json-key), *.txt
(one document per non-blank line), either compressed (*.gz, *.zst), *.parquet (the --json-key
column, by row group); files, directories (every such file below, in sorted path order) or glob
patterns. Unreadable files are rejected like bad lines. The output is byte-identical whatever
--workers. Each input file completed is kept in PREFIX.work/ until the end: a killed run rerun with
the same arguments continues from the last complete file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from flagscale.cli import examples_epilog
from flagscale.errors import OutputError

if TYPE_CHECKING:
    from flagscale.data.preprocess import PreprocessResult


def default_workers() -> int:
    """CPUs this process may run on, capped at 32."""
    return min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def report(result: PreprocessResult) -> str:
    """The rejection examples (if any) and the summary line, as printed by the command."""
    lines = rejection_lines(result)
    lines.append(result.summary())
    return "\n".join(lines)


def rejection_lines(result: PreprocessResult) -> list[str]:
    """The count and first examples of rejected records, and the skipped files, if any."""
    lines = []
    total = sum(result.rejected.values())
    if total:
        listed = f"{result.prefix}.rejected.jsonl"
        where = f"all in {listed}; " if listed in result.outputs else ""
        lines.append(f"rejected {total:,} records ({where}first "
                     f"{len(result.first_rejections)}):")
        lines += [f"  {r}" for r in result.first_rejections]
    if result.skipped_files:
        lines.append(f"skipped {len(result.skipped_files):,} files of unknown format in input "
                     f"directories, e.g. {result.skipped_files[0]}")
    return lines


def check_outputs(inputs: list[str], prefix: str) -> None:
    """Refuse an output prefix whose files would replace an input, land inside a run directory
    or a checkpoint, or replace files that no ``flagscale preprocess`` wrote (an earlier
    dataset of this command is replaced, as re-running it is meant to)."""
    from flagscale.checkpoint.output import check_output_location
    from flagscale.data.preprocess import output_paths
    from flagscale.data.provenance import FORMAT, prov_paths

    outputs = output_paths(prefix)
    for path in outputs:
        check_output_location(path, inputs, flag="--output-prefix")
    meta = prov_paths(prefix)[1]
    try:
        ours = json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    present = [path for path in outputs if os.path.lexists(path)]
    if present and not ours:
        raise OutputError(f"--output-prefix {prefix}: {', '.join(present)} already exist and are "
                          f"not an earlier `flagscale preprocess` output (no {FORMAT} "
                          f"{meta.name} beside them), so they are never replaced. Choose another "
                          f"--output-prefix, or remove those files yourself if they are "
                          f"disposable.")


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale preprocess``."""
    from flagscale.data.preprocess import preprocess
    from flagscale.data.tokenizer import load_tokenizer

    check_outputs(args.input, args.output_prefix)
    tokenizer = load_tokenizer(args.tokenizer)
    result = preprocess(args.input, args.output_prefix, tokenizer, workers=args.workers,
                        json_key=args.json_key, strict=args.strict,
                        progress=not args.quiet)
    print(report(result), file=sys.stderr if result.rejected else sys.stdout)
    return 0


def register(subparsers) -> None:
    """Add the ``preprocess`` sub-command."""
    parser = subparsers.add_parser(
        "preprocess", help="tokenize text into an indexed dataset with provenance",
        description="Tokenize JSONL / text files into megatron-core .bin/.idx with a provenance "
                    "sidecar and a file of rejected lines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog(__doc__))
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE|DIR|GLOB",
                        help="inputs (*.jsonl, *.txt, optionally .gz/.zst, *.parquet; "
                             "directories and globs in sorted path order), in document order")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, .idx, .prov.npy, .prov.json, .rejected.jsonl")
    parser.add_argument("--tokenizer", required=True, metavar="SPEC",
                        help="sentencepiece .model, HF tokenizer.json, or a directory holding one")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizing processes (default: CPUs available, at most 32)")
    parser.add_argument("--json-key", default="text",
                        help="JSONL key (Parquet column) holding the text")
    parser.add_argument("--strict", action="store_true",
                        help="stop with an error at the first rejected record or unreadable file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)

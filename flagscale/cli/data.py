"""``flagscale data inspect``: what a preprocessed dataset holds and where a document came from.
``flagscale data index-provenance``: the provenance sidecar of a dataset written without one
(Megatron-LM's tools/preprocess_data.py), rebuilt from its original inputs, every document
verified.

    flagscale data inspect out/corpus
    flagscale data inspect out/corpus --document 1234 --max-chars 0
    flagscale data inspect out/corpus --json
    flagscale data index-provenance data/pile_text_document --input pile.jsonl --tokenizer tok/
"""

from __future__ import annotations

import argparse
import json

from flagscale.cli import examples_epilog


def _clip(text: str, limit: int) -> str:
    return text if limit <= 0 or len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def format_report(info: dict, max_chars: int) -> str:
    """Human-readable form of :func:`flagscale.data.inspection.inspect_dataset`'s result."""
    lengths, doc, tok = info["lengths"], info["document"], info["tokenizer"]
    rejected = sum(info["rejected"].values())
    out = [f"dataset {info['prefix']}: {info['documents']:,} documents, {info['tokens']:,} tokens "
           f"(eod included), {rejected:,} records rejected at preprocessing",
           f"tokenizer: {tok['kind']} {tok['path']} (vocab {tok['vocab_size']}, eod {tok['eod']})",
           f"document length (tokens): min {lengths['min']}, mean {lengths['mean']:.1f}, "
           f"p50 {lengths['p50']:.0f}, p90 {lengths['p90']:.0f}, p99 {lengths['p99']:.0f}, "
           f"max {lengths['max']}",
           "histogram: " + ", ".join(f"{k}: {v}" for k, v in lengths["histogram"].items())]
    for source in info["sources"]:
        changed = " [CHANGED OR MISSING since preprocessing]" \
            if source["path"] in info["changed_sources"] else ""
        out.append(f"source: {source['path']} ({source['documents']:,} documents, "
                   f"{source['size']:,} bytes, sha256 {source['sha256'][:12]}){changed}")
    where = (f"{doc['source']} row group {doc['row_group']} row {doc['row']}"
             if doc.get("row_group") is not None
             else f"{doc['source']}:{doc['line']} (byte {doc['byte_offset']})")
    out += [f"document {doc['id']}: {doc['tokens']} tokens from {where}",
            "--- decoded ---", _clip(doc["text"], max_chars),
            "--- source record ---", _clip(doc["source_line"], max_chars)]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Entry of ``flagscale data inspect``."""
    from flagscale.data.inspection import inspect_dataset

    info = inspect_dataset(args.prefix, args.document, args.tokenizer)
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        print(format_report(info, args.max_chars))
    return 0


def run_index_provenance(args: argparse.Namespace) -> int:
    """Entry of ``flagscale data index-provenance``."""
    from flagscale.cli.preprocess import rejection_lines
    from flagscale.data.reindex import index_provenance
    from flagscale.data.tokenizer import load_tokenizer

    result = index_provenance(args.prefix, args.input, load_tokenizer(args.tokenizer),
                              workers=args.workers, json_key=args.json_key, force=args.force,
                              progress=not args.quiet)
    lines = rejection_lines(result)
    lines.append(f"verified {result.documents:,} documents ({result.tokens:,} tokens) of "
                 f"{result.prefix} against {result.input_bytes / 1e6:.2f} MB of input in "
                 f"{result.seconds:.1f} s -> {', '.join(result.outputs)}")
    print("\n".join(lines))
    return 0


def register(subparsers) -> None:
    """Add the ``data`` command group (``data inspect``, ``data index-provenance``)."""
    from flagscale.cli.preprocess import default_workers

    parser = subparsers.add_parser("data", help="inspect preprocessed datasets",
                                   description="Inspect datasets made by `flagscale preprocess`; "
                                               "index datasets written without provenance.")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    inspect = commands.add_parser(
        "inspect", help="counts, length histogram and one document with its provenance",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog(__doc__))
    inspect.add_argument("prefix", help="dataset prefix (PREFIX.bin/.idx)")
    inspect.add_argument("--document", type=int, default=0, help="document id to show (default 0)")
    inspect.add_argument("--tokenizer", help="decode with this tokenizer instead of the one the "
                         "dataset was built with")
    inspect.add_argument("--max-chars", type=int, default=1000,
                         help="clip shown text to this many characters (0: no limit)")
    inspect.add_argument("--json", action="store_true", help="print JSON for tools")
    inspect.set_defaults(func=run)

    index = commands.add_parser(
        "index-provenance", help="rebuild the provenance sidecar of a dataset written without "
        "one (Megatron-LM), verifying every document against its re-tokenized input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog(__doc__))
    index.add_argument("prefix", help="dataset prefix (PREFIX.bin/.idx)")
    index.add_argument("--input", nargs="+", required=True, metavar="FILE|DIR|GLOB",
                       help="the dataset's original inputs, in the order it was built from")
    index.add_argument("--tokenizer", required=True, metavar="SPEC",
                       help="the tokenizer the dataset was built with")
    index.add_argument("--json-key", default="text",
                       help="JSONL key (Parquet column) holding the text")
    index.add_argument("--workers", type=int, default=default_workers(),
                       help="tokenizing processes (default: CPUs available, at most 32)")
    index.add_argument("--force", action="store_true", help="replace an existing sidecar")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(func=run_index_provenance)

"""What a dataset holds: counts, document-length distribution, one document with its origin.

    info = inspect_dataset("out/corpus", document=42)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from flagscale.data.provenance import check_dataset
from flagscale.data.tokenizer import load_tokenizer
from flagscale.errors import DataError


def length_summary(lengths: np.ndarray) -> dict:
    """min / mean / percentiles / max of document lengths in tokens, plus a power-of-two
    histogram ``{"<=16": n, "<=32": n, ...}``."""
    if lengths.size == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99])
    edges = 2 ** np.arange(4, max(5, int(np.ceil(np.log2(lengths.max()))) + 1))
    counts = np.bincount(np.searchsorted(edges, lengths), minlength=len(edges))
    return {"min": int(lengths.min()), "mean": float(lengths.mean()), "p50": float(q[0]),
            "p90": float(q[1]), "p99": float(q[2]), "max": int(lengths.max()),
            "histogram": {f"<={int(e)}": int(c) for e, c in zip(edges, counts) if c}}


def inspect_dataset(prefix: str, document: int = 0, tokenizer: Optional[str] = None) -> dict:
    """Counts, length summary and document ``document`` (ids, decoded text, origin, the source
    line as it is now) of dataset ``prefix``; decoded with ``tokenizer`` or the one it was built
    with."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prov = check_dataset(prefix)
    tok = load_tokenizer(tokenizer or prov.tokenizer["path"])
    dataset = IndexedDataset(prefix)
    if len(dataset) != prov.documents:
        raise DataError(f"{prefix}.idx holds {len(dataset)} documents but its provenance "
                        f"{prov.documents}: the files come from different runs. Re-run "
                        f"`flagscale preprocess`.")
    origin = prov.lookup(document)
    ids = dataset[document]
    try:
        source_line = prov.source_line(document).decode("utf-8", errors="replace")
    except DataError as exc:
        source_line = f"(unavailable: {exc})"
    return {"prefix": prefix, "documents": prov.documents, "tokens": prov.tokens,
            "sources": [{k: s[k] for k in ("path", "documents", "size", "sha256")}
                        for s in prov.sources],
            "changed_sources": prov.changed_sources(),
            "tokenizer": prov.tokenizer, "rejected": prov.meta.get("rejected", {}),
            "lengths": length_summary(dataset.sequence_lengths),
            "document": {"id": document, "source": origin.source, "line": origin.line,
                         "byte_offset": origin.byte_offset, "row_group": origin.row_group,
                         "row": origin.row, "tokens": len(ids),
                         "ids": ids.tolist(), "text": tok.decode(ids),
                         "source_line": source_line}}

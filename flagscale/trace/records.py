"""Trace records: the documents every row of an iteration was made of, and where they came from.

A row of a microbatch reads one global sample (:mod:`flagscale.data.datasets`); the sample is a
window of ``seq_length + 1`` tokens over megatron-core's shuffled document stream, so it holds
pieces of one or more documents. For each (row, document) pair a record names the dataset prefix,
the document id, the source file and the record in it from the provenance sidecar (line and byte
offset, or for Parquet ``row_group`` and ``row_in_group``), and the span:

    token_start, token_end   the document's tokens in the sample, over its seq_length + 1 tokens
                             (the model's inputs, then the last label): spans tile that range
    doc_offset               tokens of the document before the span (where in the document)

The spans come from megatron-core's GPTDataset index arrays (REFERENCE section 2): ``shuffle_index``
maps the sample to a row of ``sample_index``, whose consecutive rows are (position in
``document_index``, token offset) of the sample's first and last token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from flagscale.config import Config, Layout
from flagscale.data.datasets import BatchSchedule, batch_index
from flagscale.errors import ConfigError


@dataclass(frozen=True)
class Span:
    """One document's piece of one sample."""

    part: int
    """Index of the dataset (prefix) in the blend; 0 without a blend."""
    document: int
    """Document id within that dataset."""
    token_start: int
    token_end: int
    doc_offset: int
    """Tokens of the document before the span."""


class Tracer:
    """Maps iterations of a run to trace records, given the run's train dataset.

    ``dataset`` is what :func:`flagscale.data.datasets.build_datasets` returned for the run: a
    megatron-core ``GPTDataset`` (one prefix) or ``BlendedDataset`` (several). Nothing here is
    collective, so one process can trace while others train.
    """

    def __init__(self, cfg: Config, layout: Layout, dataset, tokenizer=None):
        self.cfg = cfg
        self.layout = layout
        self.dataset = dataset
        self.parts = list(getattr(dataset, "datasets", [dataset]))
        self.tokenizer = tokenizer
        self.batches = BatchSchedule.for_training(cfg, layout.dp)
        self.skipped: list[int] = []
        """Batches the run skipped on its own at spikes (see
        :func:`~flagscale.data.datasets.batch_index`), besides ``data.skip_iterations``."""
        self._provenance: dict[int, object] = {}

    # ---- which sample, which documents ---------------------------------------------------------

    def rows(self, iteration: int,
             batch: Optional[int] = None) -> list[tuple[int, int, int, int]]:
        """``(microbatch, dp_rank, row, global_sample)`` of every row of 1-based ``iteration``,
        in global-sample order (the order of the iteration's global batch). ``batch``: the global
        batch to label as ``iteration``'s instead of the one it reads (a batch skipped at a spike,
        labelled with the iteration that read it, or would have; see :meth:`iteration_of`)."""
        t = self.cfg.train
        if batch is None:
            if not 1 <= iteration <= t.iterations:
                raise ConfigError(f"Iteration {iteration} is outside the run: train.iterations "
                                  f"is {t.iterations} (iterations are 1-based). Trace "
                                  f"1..{t.iterations}, or pass the config (and overrides) the "
                                  f"run was started with.")
            batch = batch_index(self.cfg, iteration - 1, self.skipped)
        rows = [(m, r, j, self.batches.sample_index(batch, m, r, j))
                for m in range(self.batches.num_microbatches(batch)) for r in range(self.layout.dp)
                for j in range(t.micro_batch_size)]
        return sorted(rows, key=lambda row: row[3])

    def iteration_of(self, batch: int) -> Optional[int]:
        """The 1-based iteration that reads global batch ``batch`` (0-based) with this tracer's
        skips; None when the batch is skipped."""
        # batch_index(i) >= i and grows with i: walk down from i = batch past the skips below it.
        i = batch
        while i > 0 and batch_index(self.cfg, i, self.skipped) > batch:
            i -= 1
        return i + 1 if batch_index(self.cfg, i, self.skipped) == batch else None

    def locate(self, global_sample: int) -> tuple[int, int]:
        """``(part, sample within that part)`` of a global sample of the train dataset."""
        if len(self.parts) == 1 and self.parts[0] is self.dataset:
            return 0, global_sample
        return (int(self.dataset.dataset_index[global_sample]),
                int(self.dataset.dataset_sample_index[global_sample]))

    def spans(self, global_sample: int) -> list[Span]:
        """The document spans of a global sample, in token order; they tile its tokens."""
        part, sample = self.locate(global_sample)
        ds = self.parts[part]
        shuffled = int(ds.shuffle_index[sample])
        first, first_offset = (int(v) for v in ds.sample_index[shuffled])
        last, last_offset = (int(v) for v in ds.sample_index[shuffled + 1])
        # The extra token is the last label: samples overlap their successor by it.
        extra = int(ds.config.add_extra_token_to_sequence)
        lengths = ds.dataset.sequence_lengths
        spans, position = [], 0
        for k in range(first, last + 1):
            document = int(ds.document_index[k])
            begin = first_offset if k == first else 0
            end = last_offset + extra if k == last else int(lengths[document])
            if end > begin:
                spans.append(Span(part, document, position, position + end - begin, begin))
                position += end - begin
        return spans

    def span_tokens(self, span: Span):
        """The token ids of ``span`` (numpy), read from the indexed dataset."""
        return self.parts[span.part].dataset.get(span.document, offset=span.doc_offset,
                                                 length=span.token_end - span.token_start)

    # ---- records -------------------------------------------------------------------------------

    def records(self, iteration: int, losses: Optional[Mapping[int, float]] = None,
                batch: Optional[int] = None) -> list[dict]:
        """Trace records of 1-based ``iteration``: one per (row, document), in global-sample order.

        ``losses`` maps global samples to their recorded per-sample loss; records of those
        samples carry it. ``batch`` as in :meth:`rows`.
        """
        out = []
        for microbatch, dp_rank, row, sample in self.rows(iteration, batch):
            loss = None if losses is None or sample not in losses else float(losses[sample])
            for span in self.spans(sample):
                out.append(self._record(iteration, microbatch, dp_rank, row, sample, span, loss))
        return out

    def _record(self, iteration, microbatch, dp_rank, row, sample, span: Span, loss) -> dict:
        # Line formats fill line/byte_offset, Parquet row_group/row_in_group (the contract's
        # `row` is the microbatch row); all four are null without a provenance sidecar.
        origin = None
        provenance = self._provenance_of(span.part)
        if provenance is not None:
            origin = provenance.lookup(span.document)
        record = {"iteration": iteration, "microbatch": microbatch, "dp_rank": dp_rank,
                  "row": row, "global_sample": sample,
                  "dataset": self.parts[span.part].dataset_path, "document": span.document,
                  "source": origin and origin.source, "line": origin and origin.line,
                  "byte_offset": origin and origin.byte_offset,
                  "row_group": origin and origin.row_group,
                  "row_in_group": origin and origin.row,
                  "token_start": span.token_start, "token_end": span.token_end,
                  "doc_offset": span.doc_offset, "text": self._text(span)}
        if loss is not None:
            finite = math.isfinite(loss)
            # JSON has no NaN: a non-finite loss is null, flagged so it reads apart from "unknown".
            record["loss"] = loss if finite else None
            if not finite:
                record["loss_nonfinite"] = str(loss)
        return record

    def _text(self, span: Span) -> Optional[str]:
        limit = self.cfg.trace.text_chars
        if self.tokenizer is None or limit == 0:
            return None
        tokens = self.span_tokens(span)
        # A token decodes to at least a quarter of a character (a UTF-8 byte), so this many
        # tokens cover the limit; decoding whole long documents would dominate a report's time.
        ids = [int(t) for t in tokens[:4 * limit + 4]]
        text = self.tokenizer.decode(ids)
        cut = len(text) > limit or len(ids) < len(tokens)
        return text[:limit] + "…" if cut else text

    def _provenance_of(self, part: int):
        if part not in self._provenance:
            from flagscale.data.provenance import Provenance, prov_paths

            prefix = self.parts[part].dataset_path
            # Without a sidecar (check_training_data warned) records name documents by id only.
            self._provenance[part] = (Provenance.open(prefix) if prov_paths(prefix)[1].is_file()
                                      else None)
        return self._provenance[part]


"""Trace records name exactly what the training loop fed: the document spans of every row rebuild
the row's tokens, and each span is the named slice of the named line of the source file."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from flagscale.config import load_config, validate
from flagscale.data import load_tokenizer, preprocess
from flagscale.data.datasets import batch_index, build_datasets, microbatches
from flagscale.data.provenance import Provenance
from flagscale.errors import ConfigError
from flagscale.trace import Tracer, report_path, trace_iterations, write_report

from megatron.core.datasets.indexed_dataset import IndexedDataset


def _config(paths, tokenizer, run_dir, *extra):
    return load_config(overrides=[
        "model.preset=tiny", f"data.paths={paths}", f"data.tokenizer={tokenizer}",
        "parallel.dp=2", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.seq_length=32", "train.iterations=6", f"run.dir={run_dir}", *extra])


def _rows(records):
    rows = defaultdict(list)
    for r in records:
        rows[(r["iteration"], r["microbatch"], r["dp_rank"], r["row"])].append(r)
    return rows


def _span_tokens(record, indexed):
    if record["dataset"] not in indexed:
        indexed[record["dataset"]] = IndexedDataset(record["dataset"])
    return indexed[record["dataset"]].get(record["document"], offset=record["doc_offset"],
                                          length=record["token_end"] - record["token_start"])


def _assert_records_rebuild_fed_rows(cfg, records, tmp_path, dataset=None):
    """Every row the loop's feeder yields equals the concatenation of its records' spans."""
    layout = validate(cfg, world_size=2)
    if dataset is None:
        # An independent build (another cache): the index arrays are deterministic.
        dataset, _ = build_datasets(cfg, layout, eod=3, cache_dir=tmp_path / "loop_cache")
    rows, indexed = _rows(records), {}
    iterations = sorted({r["iteration"] for r in records})
    assert len(rows) == len(iterations) * cfg.train.global_batch_size
    for it in iterations:
        for dp_rank in range(layout.dp):
            for m, batch in enumerate(microbatches(dataset, cfg, layout, dp_rank,
                                                   batch_index(cfg, it - 1), torch.device("cpu"))):
                for j in range(cfg.train.micro_batch_size):
                    spans = rows[(it, m, dp_rank, j)]
                    assert [s["token_start"] for s in spans[1:]] == \
                        [s["token_end"] for s in spans[:-1]]
                    assert spans[0]["token_start"] == 0
                    assert spans[-1]["token_end"] == cfg.train.seq_length + 1
                    fed = torch.cat([batch["tokens"][j], batch["labels"][j][-1:]]).numpy()
                    spanned = np.concatenate([_span_tokens(s, indexed) for s in spans])
                    assert np.array_equal(spanned, fed)


def _source_text(record) -> str:
    prov = Provenance.open(record["dataset"])
    return json.loads(prov.source_line(record["document"]))["text"]


def test_records_rebuild_every_fed_row_and_point_at_the_source_line(tmp_path, tiny_corpus,
                                                                    tiny_tokenizer):
    cfg = _config(f"[{tiny_corpus}]", tiny_tokenizer, tmp_path / "run", "trace.text_chars=100000")
    records = list(trace_iterations(cfg, 2, 3))
    _assert_records_rebuild_fed_rows(cfg, records, tmp_path)

    tokenizer, indexed = load_tokenizer(tiny_tokenizer), {}
    source = records[0]["source"]
    with gzip.open(source, "rb") as f:
        lines = f.read().split(b"\n")
    for r in records:
        assert r["source"] == source and r["dataset"] == tiny_corpus
        # The line number and the byte offset name the same line of the input file.
        assert lines[r["line"] - 1] == Provenance.open(tiny_corpus).source_line(r["document"])
        text = _source_text(r)
        document_tokens = tokenizer.encode(text) + [tokenizer.eod]
        span = _span_tokens(r, indexed)
        assert document_tokens[r["doc_offset"]:r["doc_offset"] + len(span)] == span.tolist()
        # Decoded text: a substring of the line's text, but for a multi-byte character cut at
        # the span's edge (decoded as U+FFFD).
        assert r["text"].strip().strip("\ufffd").strip() in text

    short = list(trace_iterations(_config(f"[{tiny_corpus}]", tiny_tokenizer, tmp_path / "run",
                                          "trace.text_chars=20"), 2, 3))
    assert any(s["text"].endswith("…") for s in short)
    for s, r in zip(short, records):
        assert s["text"] == (r["text"] if len(r["text"]) <= 20 else r["text"][:20] + "…")


@pytest.fixture(scope="module")
def beta_corpus(tmp_path_factory, tiny_tokenizer):
    """A second dataset whose documents are recognisable: 'beta document N ...'."""
    root = tmp_path_factory.mktemp("beta")
    source = root / "beta.jsonl"
    source.write_text("".join(json.dumps({"text": f"beta document {i} " + "lorem ipsum " * (i % 9)})
                              + "\n" for i in range(400)))
    preprocess([str(source)], str(root / "beta"), load_tokenizer(tiny_tokenizer), workers=1,
               progress=False)
    return str(root / "beta"), str(source)


def _weighted_blend(cfg, layout, cache_dir):
    """The train split of ``cfg``'s weighted blend, built like build_datasets builds it but asking
    for 0 (not None) valid/test samples, which megatron-core 0.16.1 requires with weights."""
    from types import SimpleNamespace

    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from flagscale.config import data_prefixes
    from flagscale.platform import world_of_one

    prefixes = data_prefixes(cfg)
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=cfg.train.seq_length,
        blend=([p for _, p in prefixes], [w for w, _ in prefixes]), split=cfg.data.split,
        path_to_cache=str(cache_dir), reset_position_ids=False, reset_attention_mask=False,
        tokenizer=SimpleNamespace(vocab_size=cfg.model.vocab_size, eod=3, pad=-1,
                                  unique_identifiers={}),
        eod_mask_loss=False, create_attention_mask=False, mid_level_dataset_surplus=0.005)
    samples = cfg.train.iterations * cfg.train.global_batch_size
    with world_of_one():
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True,
                                                    config).build()
    return train


def test_blended_datasets_name_each_prefix_and_its_source(tmp_path, tiny_corpus, tiny_tokenizer,
                                                          beta_corpus):
    beta, beta_source = beta_corpus
    cfg = _config(f"[0.5, {tiny_corpus}, 0.5, {beta}]", tiny_tokenizer, tmp_path / "run")
    layout = validate(cfg, world_size=2)
    dataset = _weighted_blend(cfg, layout, tmp_path / "cache")
    tracer = Tracer(cfg, layout, dataset, load_tokenizer(tiny_tokenizer))
    records = tracer.records(1) + tracer.records(2)
    _assert_records_rebuild_fed_rows(cfg, records, tmp_path, dataset)
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    assert set(by_dataset) == {tiny_corpus, beta}
    for r in by_dataset[beta]:
        assert r["source"] == beta_source
        assert _source_text(r).startswith(f"beta document {r['line'] - 1} ")
    assert all(r["source"].endswith("corpus.jsonl.gz") for r in by_dataset[tiny_corpus])


def test_weighted_blend_traces_end_to_end(tmp_path, tiny_corpus, tiny_tokenizer, beta_corpus):
    cfg = _config(f"[0.5, {tiny_corpus}, 0.5, {beta_corpus[0]}]", tiny_tokenizer,
                  tmp_path / "run")
    records = list(trace_iterations(cfg, 1))
    assert {r["dataset"] for r in records} == {tiny_corpus, beta_corpus[0]}


def _what(records):
    return [(r["global_sample"], r["dataset"], r["document"], r["token_start"], r["token_end"])
            for r in records]


def test_skipped_iterations_shift_the_traced_samples(tmp_path, tiny_corpus, tiny_tokenizer):
    plain = _config(f"[{tiny_corpus}]", tiny_tokenizer, tmp_path / "run")
    skipping = _config(f"[{tiny_corpus}]", tiny_tokenizer, tmp_path / "run",
                       "data.skip_iterations=[3]")
    before = list(trace_iterations(plain, 2, 4))
    after = list(trace_iterations(skipping, 2, 3))
    by_iteration = defaultdict(list)
    for r in before:
        by_iteration[r["iteration"]].append(r)
    assert _what(after[:len(by_iteration[2])]) == _what(by_iteration[2])
    # Iteration 3 now reads the batch iteration 4 read before the skip.
    assert _what([r for r in after if r["iteration"] == 3]) == _what(by_iteration[4])
    assert _what(by_iteration[3]) != _what(by_iteration[4])


def test_recorded_losses_attach_only_to_the_batch_they_were_recorded_for(tmp_path, tiny_corpus,
                                                                         tiny_tokenizer):
    run_dir = tmp_path / "run"
    cfg = _config(f"[{tiny_corpus}]", tiny_tokenizer, run_dir)
    records = list(trace_iterations(cfg, 2))
    losses = {r["global_sample"]: 1.0 + r["global_sample"] / 100 for r in records}
    losses[min(losses)] = float("nan")
    write_report(report_path(run_dir, 2), [{**r, "loss": losses[r["global_sample"]]}
                                           if r["global_sample"] != min(losses) else
                                           {**r, "loss": None, "loss_nonfinite": "nan"}
                                           for r in records])
    traced = list(trace_iterations(cfg, 2))
    for r in traced:
        if r["global_sample"] == min(losses):
            assert r["loss"] is None and r["loss_nonfinite"] == "nan"
        else:
            assert r["loss"] == pytest.approx(losses[r["global_sample"]])
    skipping = _config(f"[{tiny_corpus}]", tiny_tokenizer, run_dir, "data.skip_iterations=[2]")
    assert all("loss" not in r for r in trace_iterations(skipping, 2))


def test_data_parallel_size_only_relabels_rows(tmp_path, tiny_corpus, tiny_tokenizer):
    cfg = _config(f"[{tiny_corpus}]", tiny_tokenizer, tmp_path / "run", "parallel.dp=null")
    with pytest.raises(ConfigError, match="--dp"):
        next(trace_iterations(cfg, 1))
    two, four = list(trace_iterations(cfg, 1, dp=2)), list(trace_iterations(cfg, 1, dp=4))
    assert _what(two) == _what(four)
    assert {r["dp_rank"] for r in four} == {0, 1, 2, 3}
    assert {r["microbatch"] for r in four} == {0}


def test_megatron_lm_dataset_without_sidecar_traces_to_documents(tmp_path, tiny_tokenizer,
                                                                 capsys):
    """A dataset written as Megatron-LM's preprocess_data.py writes it (IndexedDatasetBuilder, one
    add_document per document, no sidecar) passes the pre-launch check with a note and traces to
    dataset, document, span and text; file and line are null."""
    from flagscale.cli.trace import run_trace
    from flagscale.data import default_corpus_path
    from flagscale.data.datasets import check_training_data
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = load_tokenizer(tiny_tokenizer)
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:400]
    prefix = str(tmp_path / "megatron_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        ids = tokenizer.encode(text) + [tokenizer.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")

    cfg = _config(f"[{prefix}]", tiny_tokenizer, tmp_path / "run", "trace.text_chars=100000")
    with pytest.warns(UserWarning, match="no provenance sidecar"):
        check_training_data(cfg)
    records = list(trace_iterations(cfg, 1, 2))
    _assert_records_rebuild_fed_rows(cfg, records, tmp_path)
    for r in records:
        assert r["dataset"] == prefix
        assert (r["source"], r["line"], r["byte_offset"], r["row_group"], r["row_in_group"]) == \
            (None,) * 5
        # The named document's text holds the decoded span.
        assert r["text"].strip().strip("\ufffd").strip() in texts[r["document"]]
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{preset: tiny}}\ndata: {{paths: [{prefix}], tokenizer: "
                      f"{tiny_tokenizer}}}\nparallel: {{dp: 2}}\ntrain: {{micro_batch_size: 2, "
                      f"global_batch_size: 8, seq_length: 32, iterations: 6}}\n"
                      f"run: {{dir: {tmp_path / 'run'}}}\n")
    run_trace(str(config), 1, fmt="text")
    out = capsys.readouterr().out
    assert f"{prefix} document {records[0]['document']}" in out
    assert "file and line need one" in out

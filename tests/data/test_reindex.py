"""`flagscale data index-provenance`: the sidecar of a dataset written as Megatron-LM writes it,
rebuilt from its inputs with every document verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from flagscale.cli.main import main
from flagscale.config import load_config
from flagscale.data import check_dataset, default_tokenizer_path, preprocess
from flagscale.data.provenance import prov_paths
from flagscale.data.reindex import index_provenance
from flagscale.errors import DataError
from flagscale.trace import trace_iterations


def megatron_dataset(prefix, texts, tokenizer, append_eod: bool = True) -> str:
    """A dataset as Megatron-LM's tools/preprocess_data.py writes it: one add_document per
    document of IndexedDatasetBuilder, no sidecar."""
    prefix = str(prefix)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for text in texts:
        ids = tokenizer.encode(text) + ([tokenizer.eod] if append_eod else [])
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_rebuilt_sidecar_is_the_one_preprocess_writes(tmp_path, inputs, sp_tokenizer):
    files, expected, _ = inputs
    prefix = megatron_dataset(tmp_path / "megatron_text_document", [t for _, _, t in expected],
                              sp_tokenizer)
    result = index_provenance(prefix, files, sp_tokenizer, workers=2, block_bytes=64)
    preprocess(files, tmp_path / "ours", sp_tokenizer)
    (npy, meta), (our_npy, our_meta) = prov_paths(prefix), prov_paths(tmp_path / "ours")
    assert npy.read_bytes() == our_npy.read_bytes()
    assert json.loads(meta.read_text()) == json.loads(our_meta.read_text())
    assert result.documents == len(expected) and result.outputs == [str(npy), str(meta)]
    # Training checks its tokenizer, and traces name file and line of every document.
    prov = check_dataset(prefix, sp_tokenizer)
    for doc_id, (path, line, _) in enumerate(expected):
        assert tuple(prov.lookup(doc_id))[:2] == (str(path.resolve()), line)
    cfg = load_config(overrides=[
        "model.preset=tiny", f"data.paths=[{prefix}]", f"data.tokenizer={sp_tokenizer.path}",
        "parallel.dp=2", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.seq_length=32", "train.iterations=2", f"run.dir={tmp_path / 'run'}"])
    traced = list(trace_iterations(cfg, 1, 1))
    assert traced and all(
        (r["source"], r["line"]) == (str(expected[r["document"]][0].resolve()),
                                     expected[r["document"]][1]) for r in traced)

    with pytest.raises(DataError, match="never replaced without --force"):
        index_provenance(prefix, files, sp_tokenizer)
    before = npy.read_bytes()
    index_provenance(prefix, files, sp_tokenizer, force=True)
    assert npy.read_bytes() == before and list(tmp_path.glob("*.tmp*")) == []


def test_mismatches_name_document_record_and_cause(tmp_path, inputs, sp_tokenizer):
    files, expected, _ = inputs
    texts = [t for _, _, t in expected]
    no_eod = megatron_dataset(tmp_path / "no_eod", texts, sp_tokenizer, append_eod=False)
    with pytest.raises(DataError, match=rf"Document 0 of dataset {no_eod} does not match its "
                                        rf"input record {files[0]}:1 .*built without "
                                        rf"--append-eod"):
        index_provenance(no_eod, files, sp_tokenizer)

    prefix = megatron_dataset(tmp_path / "ds", texts, sp_tokenizer)
    # Files in another order: the first document already differs.
    with pytest.raises(DataError, match=rf"Document 0 of dataset {prefix} does not match its "
                                        rf"input record {files[2]}:1 .*order"):
        index_provenance(prefix, files[::-1], sp_tokenizer, workers=2)
    # A file left out of --input: every document given matches, some are missing.
    complete = megatron_dataset(tmp_path / "complete", texts, sp_tokenizer)
    with pytest.raises(DataError, match=rf"holds {len(texts)} documents, but its inputs give "
                                        rf"only {len(texts) - 3} .*missing"):
        index_provenance(complete, files[:2], sp_tokenizer)
    # One changed line in the middle: named by its document index, file and line.
    path, line, _ = expected[20]
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = json.dumps({"text": "a different text"}).encode()
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"Document 20 of dataset {prefix} does not match its "
                                        rf"input record {path}:{line} re-tokenized"):
        index_provenance(prefix, files, sp_tokenizer, workers=2, block_bytes=64)
    assert not any(p.exists() for name in ("no_eod", "ds", "complete")
                   for p in prov_paths(tmp_path / name))


def test_index_provenance_command(tmp_path, inputs, capsys):
    files, expected, rejections = inputs
    from flagscale.data import load_tokenizer

    prefix = megatron_dataset(tmp_path / "megatron_text_document", [t for _, _, t in expected],
                              load_tokenizer(default_tokenizer_path()))
    code = main(["data", "index-provenance", prefix, "--input", *map(str, files),
                 "--tokenizer", str(default_tokenizer_path()), "--workers", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"verified {len(expected):,} documents" in out
    assert f"rejected {len(rejections):,} records" in out
    path, line, text = expected[3]
    assert main(["data", "inspect", prefix, "--document", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{path.resolve()}:{line}" in out and text in out


def test_parquet_documents_are_named_by_row_group_and_row(tmp_path, sp_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"parquet document {i} 第{i}行" for i in range(30)]
    source = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": texts}), source, row_group_size=7)
    prefix = megatron_dataset(tmp_path / "web", texts, sp_tokenizer)
    index_provenance(prefix, [source], sp_tokenizer)
    origin = check_dataset(prefix, sp_tokenizer).lookup(15)
    assert (origin.source, origin.row_group, origin.row) == (str(source.resolve()), 2, 1)
    wrong = megatron_dataset(tmp_path / "wrong", texts[:15] + ["other"] + texts[16:],
                             sp_tokenizer)
    with pytest.raises(DataError, match=rf"Document 15 of dataset {wrong} does not match its "
                                        rf"input record {source} row group 2 row 1 "):
        index_provenance(wrong, [source], sp_tokenizer, workers=2)

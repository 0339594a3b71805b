"""Corpus formats: JSONL, .gz, .zst, Parquet, directories and globs of shards give the same dataset,
and provenance points at the right record in each."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from flagscale.data import Provenance, preprocess
from flagscale.errors import DataError

TEXTS = [f"document {i}: 白日依山尽 {'word ' * (i % 7)}🚀 end" for i in range(45)] + [
    "multi\nline\ttext", "Ünïcödé ñ ß — «quotes» 日本語"]


def jsonl(texts) -> bytes:
    return b"".join(json.dumps({"text": t, "id": i}, ensure_ascii=False).encode() + b"\n"
                    for i, t in enumerate(texts))


def write(path, texts):
    """Write ``texts`` in the format ``path``'s name says; Parquet in row groups of 7 rows."""
    if path.suffix == ".parquet":
        table = pa.table({"id": list(range(len(texts))), "text": texts})
        pq.write_table(table, path, row_group_size=7)
    elif path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(texts)))
    elif path.suffix == ".gz":
        path.write_bytes(gzip.compress(jsonl(texts)))
    else:
        path.write_bytes(jsonl(texts))
    return path


def dataset_bytes(prefix) -> tuple[bytes, bytes]:
    return (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())


def test_every_format_gives_the_same_dataset_and_exact_provenance(tmp_path, sp_tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "00.jsonl.zst", TEXTS[:20])
    write(shards / "01.parquet", TEXTS[20:40])
    write(shards / "02.jsonl.gz", TEXTS[40:])
    (shards / "README.md").write_text("not data\n")
    corpora = {"jsonl": [write(tmp_path / "c.jsonl", TEXTS)],
               "zst": [write(tmp_path / "c.jsonl.zst", TEXTS)],
               "gz": [write(tmp_path / "c.jsonl.gz", TEXTS)],
               "parquet": [write(tmp_path / "c.parquet", TEXTS)],
               "directory": [shards],
               "glob": [str(shards / "0*")]}
    reference = None
    for name, inputs in corpora.items():
        prefix = tmp_path / "out" / name
        result = preprocess(inputs, prefix, sp_tokenizer, workers=2, block_bytes=64)
        assert result.documents == len(TEXTS)
        assert result.skipped_files == ([str(shards / "README.md")] if name == "directory"
                                        else [])
        reference = reference or dataset_bytes(prefix)
        assert dataset_bytes(prefix) == reference, name
        dataset, prov = IndexedDataset(str(prefix)), Provenance.open(prefix)
        for doc_id, text in enumerate(TEXTS):
            assert sp_tokenizer.decode(dataset[doc_id]) == text
            origin = prov.lookup(doc_id)
            raw = prov.source_line(doc_id).decode("utf-8")
            if origin.row_group is None:  # a JSON line: parse it as a user would
                assert (origin.line - 1, origin.row) == (json.loads(raw)["id"], None)
                raw = json.loads(raw)["text"]
            else:  # the row, read with pyarrow by row group and row
                group = pq.ParquetFile(origin.source).read_row_group(origin.row_group)
                assert group.column("text")[origin.row].as_py() == raw
                assert (origin.line, origin.byte_offset) == (None, None)
            assert raw == text
    parquet = Provenance.open(tmp_path / "out" / "parquet")
    assert (parquet.lookup(15).row_group, parquet.lookup(15).row) == (2, 1)
    directory = Provenance.open(tmp_path / "out" / "directory")
    assert [s["path"] for s in directory.sources] == [
        str((shards / n).resolve()) for n in ("00.jsonl.zst", "01.parquet", "02.jsonl.gz")]


def test_bad_shards_are_rejections_and_strict_stops(tmp_path, sp_tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "a.jsonl", TEXTS[:10])
    truncated = zstandard.ZstdCompressor().compress(jsonl(TEXTS[10:20]))[:-9]
    (shards / "b.jsonl.zst").write_bytes(truncated)
    (shards / "c.parquet").write_bytes(b"PAR1 not really parquet")
    pq.write_table(pa.table({"body": ["x"]}), shards / "d.parquet")
    pq.write_table(pa.table({"text": ["kept", None, " "]}), shards / "e.parquet")
    result = preprocess([shards], tmp_path / "ds", sp_tokenizer, workers=2)
    rejected = [json.loads(line) for line in (tmp_path / "ds.rejected.jsonl").open()]
    by_source = {(r["source"].rsplit("/", 1)[1], r["reason"]): r for r in rejected}
    assert set(by_source) == {("b.jsonl.zst", "unreadable file"), ("c.parquet", "unreadable file"),
                              ("d.parquet", "missing key"), ("e.parquet", "null text"),
                              ("e.parquet", "empty text")}
    assert by_source["b.jsonl.zst", "unreadable file"]["line"] == 1
    assert (by_source["e.parquet", "null text"]["row_group"],
            by_source["e.parquet", "null text"]["row"]) == (0, 1)
    assert by_source["e.parquet", "null text"]["line"] is None
    assert result.documents == 11  # a.jsonl and the one good Parquet row
    dataset = IndexedDataset(str(tmp_path / "ds"))  # its arrays are views of its memory map
    assert sp_tokenizer.decode(dataset[10]) == "kept"
    with pytest.raises(DataError, match="b.jsonl.zst: cannot read it from line 1"):
        preprocess([shards], tmp_path / "strict", sp_tokenizer, strict=True)
    assert list(tmp_path.glob("strict*")) == []


def test_input_expansion_errors(tmp_path, sp_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no input files"):
        preprocess([tmp_path / "empty"], tmp_path / "ds", sp_tokenizer)
    with pytest.raises(DataError, match="matches no files"):
        preprocess([str(tmp_path / "*.jsonl")], tmp_path / "ds", sp_tokenizer)
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match="unknown format"):
        preprocess([tmp_path / "x.parquet.gz"], tmp_path / "ds", sp_tokenizer)

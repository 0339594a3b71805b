"""Preprocessing: exact documents, exact provenance, worker-count independence, rejections."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from flagscale.data import Provenance, check_dataset, preprocess
from flagscale.errors import DataError


def read_line_at(path, offset: int) -> bytes:
    """The line starting at ``offset`` of ``path``, read the way a user would check it."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        before = f.read(offset)
        line = f.readline()
    assert offset == 0 or before.endswith(b"\n"), "offset is not at a line start"
    return line.rstrip(b"\n"), before.count(b"\n") + 1


@pytest.mark.parametrize("workers,block_bytes", [(1, 1 << 18), (3, 16)])
def test_documents_and_provenance_are_exact(tmp_path, inputs, sp_tokenizer, workers,
                                            block_bytes):
    files, expected, _ = inputs
    prefix = tmp_path / "out" / "ds"
    result = preprocess(files, prefix, sp_tokenizer, workers=workers, block_bytes=block_bytes)
    dataset = IndexedDataset(str(prefix))
    prov = Provenance.open(prefix)
    assert len(dataset) == len(prov) == result.documents == len(expected)
    assert dataset.index.dtype == np.uint16
    assert result.tokens == int(dataset.sequence_lengths.sum()) == prov.tokens
    for doc_id, (path, line, text) in enumerate(expected):
        ids = dataset[doc_id].tolist()
        assert ids == sp_tokenizer.encode(text) + [sp_tokenizer.eod]
        assert sp_tokenizer.decode(ids) == text
        source, prov_line, offset = prov.lookup(doc_id)
        assert (source, prov_line) == (str(path.resolve()), line)
        raw, counted_line = read_line_at(path, offset)
        assert counted_line == line
        record = raw.decode("utf-8")
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            record = json.loads(record)["text"]
        assert record.rstrip("\r") == text
        assert prov.source_line(doc_id) == raw


def test_output_is_byte_identical_across_workers_and_blocks(tmp_path, inputs, sp_tokenizer):
    files, _, _ = inputs
    outputs = []
    for workers, block_bytes in ((1, 1 << 18), (3, 16), (2, 1000)):
        prefix = tmp_path / f"w{workers}"
        preprocess(files, prefix, sp_tokenizer, workers=workers, block_bytes=block_bytes)
        outputs.append([(tmp_path / f"w{workers}{ext}").read_bytes()
                        for ext in (".bin", ".idx", ".prov.npy", ".rejected.jsonl")])
    assert outputs[0] == outputs[1] == outputs[2]


def test_index_matches_megatron_builder_per_document(tmp_path, inputs, sp_tokenizer):
    files, expected, _ = inputs
    preprocess(files, tmp_path / "ours", sp_tokenizer)
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for _, _, text in expected:
        ids = sp_tokenizer.encode(text) + [sp_tokenizer.eod]
        reference.add_document(np.array(ids), [len(ids)])
    reference.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_rejected_lines_are_listed_and_counted(tmp_path, inputs, sp_tokenizer):
    files, _, rejections = inputs
    prefix = tmp_path / "ds"
    result = preprocess(files, prefix, sp_tokenizer, workers=2, block_bytes=64)
    rows = [json.loads(line) for line in
            (tmp_path / "ds.rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["source"], r["line"], r["reason"]) for r in rows] == \
        [(str(path), line, reason) for path, line, reason in rejections]
    for row in rows:
        path = next(p for p in files if str(p) == row["source"])
        assert read_line_at(path, row["byte_offset"])[1] == row["line"]
    counts = {}
    for _, _, reason in rejections:
        counts[reason] = counts.get(reason, 0) + 1
    assert dict(result.rejected) == counts
    assert json.loads((tmp_path / "ds.prov.json").read_text())["rejected"] == counts
    shown = [str(r) for r in result.first_rejections]
    assert shown[0].startswith(f"{files[0]}:4: invalid JSON")
    assert shown[1].startswith(f"{files[0]}:5: invalid UTF-8")


def test_strict_stops_at_first_rejection_and_leaves_no_output(tmp_path, inputs, sp_tokenizer):
    files, _, _ = inputs
    prefix = tmp_path / "ds"
    with pytest.raises(DataError, match=rf"{files[0]}:4: invalid JSON"):
        preprocess(files, prefix, sp_tokenizer, workers=2, strict=True)
    assert list(tmp_path.glob("ds*")) == []


def test_failed_run_keeps_previous_good_output(tmp_path, inputs, sp_tokenizer):
    files, _, _ = inputs
    prefix = tmp_path / "ds"
    preprocess(files, prefix, sp_tokenizer)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ds.*")}
    with pytest.raises(DataError):
        preprocess(files, prefix, sp_tokenizer, strict=True)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ds.*")} == before


def test_sources_are_fingerprinted(tmp_path, inputs, sp_tokenizer):
    files, _, _ = inputs
    preprocess(files, tmp_path / "ds", sp_tokenizer)
    prov = Provenance.open(tmp_path / "ds")
    assert [s["size"] for s in prov.sources] == [p.stat().st_size for p in files]
    assert prov.changed_sources() == []
    files[2].write_bytes(files[2].read_bytes().replace(b"one", b"uno"))
    assert prov.changed_sources() == [str(files[2].resolve())]


def test_check_dataset_errors(tmp_path, inputs, sp_tokenizer, other_sp_tokenizer):
    files, _, _ = inputs
    with pytest.raises(DataError, match="not found"):
        check_dataset(tmp_path / "missing", sp_tokenizer)
    preprocess(files, tmp_path / "ds", sp_tokenizer)
    assert check_dataset(tmp_path / "ds", sp_tokenizer).tokenizer_vocab_size == 4096
    with pytest.raises(DataError, match="same vocab size, different tokenizer"):
        check_dataset(tmp_path / "ds", other_sp_tokenizer)
    (tmp_path / "other.jsonl").write_text('{"text": "another run"}\n')
    preprocess([tmp_path / "other.jsonl"], tmp_path / "other", sp_tokenizer)
    (tmp_path / "ds.bin").write_bytes((tmp_path / "other.bin").read_bytes())
    with pytest.raises(DataError, match="truncated or from another run"):
        check_dataset(tmp_path / "ds", sp_tokenizer)
    (tmp_path / "ds.prov.json").unlink()
    with pytest.raises(DataError, match="no provenance sidecar"):
        check_dataset(tmp_path / "ds", sp_tokenizer)


def test_input_errors(tmp_path, sp_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "ds", sp_tokenizer)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        preprocess([tmp_path / "data.csv"], tmp_path / "ds", sp_tokenizer)
    (tmp_path / "keys.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="No documents.*missing key"):
        preprocess([tmp_path / "keys.jsonl"], tmp_path / "ds", sp_tokenizer)
    result = preprocess([tmp_path / "keys.jsonl"], tmp_path / "ds", sp_tokenizer,
                        json_key="content")
    assert result.documents == 1


def test_byte_order_mark_is_not_text(tmp_path, sp_tokenizer):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    preprocess([path], tmp_path / "ds", sp_tokenizer)
    dataset, prov = IndexedDataset(str(tmp_path / "ds")), Provenance.open(tmp_path / "ds")
    assert sp_tokenizer.decode(dataset[0]) == "first"
    assert tuple(prov.lookup(0))[1:] == (1, 3) and tuple(prov.lookup(1))[1:] == (2, 9)


def test_truncated_gzip_is_an_error(tmp_path, inputs, sp_tokenizer):
    files, _, _ = inputs
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(files[1].read_bytes()[:-20])
    with pytest.raises(DataError, match="broken.jsonl.gz: cannot read it"):
        preprocess([broken], tmp_path / "ds", sp_tokenizer)
    assert list(tmp_path.glob("ds*")) == []


_KILLED_RUN = """
import sys
from flagscale.data import load_tokenizer, preprocess
preprocess([sys.argv[1]], sys.argv[2], load_tokenizer(sys.argv[3]), workers=2, block_bytes=4096)
"""


def test_killed_run_resumes_from_last_complete_shard(tmp_path, sp_tokenizer):
    """A run killed with SIGKILL part-way through a directory of shards, rerun with the same
    arguments, tokenizes only the shards not yet complete and writes the same bytes as an
    uninterrupted run; other arguments are refused, naming what changed."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from flagscale.data import default_corpus_path
    from flagscale.data.preprocess import work_dir

    lines = gzip.open(default_corpus_path(), "rb").read().splitlines(keepends=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(12):
        (shards / f"part-{n:02d}.jsonl").write_bytes(b"".join(lines[n * 400:(n + 1) * 400]))
    prefix, work = tmp_path / "out" / "ds", work_dir(tmp_path / "out" / "ds")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(shards), str(prefix), sp_tokenizer.path],
        env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob("0*.json")) and process.poll() is None:
            assert time.monotonic() < deadline, "no shard completed in 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    finally:
        try:  # its pool workers, should any outlive it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    completed = len(list(work.glob("0*.json")))
    assert 1 <= completed < 12 and not (tmp_path / "out" / "ds.bin").exists()

    renamed = tmp_path / "renamed.model"
    shutil.copy(sp_tokenizer.path, renamed)
    from flagscale.data import load_tokenizer

    with pytest.raises(DataError, match=rf"{work} holds the completed shards .*the tokenizer was "
                                        rf"{sp_tokenizer.path} .*now {renamed}"):
        preprocess([shards], prefix, load_tokenizer(renamed), workers=2)
    (shards / "part-11.jsonl").write_bytes(b'{"text": "changed"}\n')
    with pytest.raises(DataError, match=r"input file .*part-11.jsonl changed since"):
        preprocess([shards], prefix, sp_tokenizer, workers=2)
    (shards / "part-11.jsonl").write_bytes(b"".join(lines[11 * 400:12 * 400]))

    resumed = preprocess([shards], prefix, sp_tokenizer, workers=2)
    assert resumed.resumed_files == completed and not work.exists()
    whole = preprocess([shards], tmp_path / "whole", sp_tokenizer, workers=1)
    assert (resumed.documents, resumed.tokens) == (whole.documents, whole.tokens)
    for ext in (".bin", ".idx", ".prov.npy", ".prov.json", ".rejected.jsonl"):
        assert (tmp_path / "out" / f"ds{ext}").read_bytes() == \
            (tmp_path / f"whole{ext}").read_bytes(), ext


def test_a_directory_in_the_work_dirs_place_is_never_deleted(tmp_path, inputs, sp_tokenizer):
    files, _, _ = inputs
    mine = tmp_path / "ds.work"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="ds.work exists and is not a preprocessing work dir"):
        preprocess(files, tmp_path / "ds", sp_tokenizer)
    assert (mine / "notes.txt").read_text() == "mine"

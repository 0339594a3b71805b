"""``metrics.jsonl`` after a crash: a last line cut short is dropped with a note naming the file
(resume, plot and trace go on); a bad line anywhere else is an error naming file and line."""

from __future__ import annotations

import json

import pytest

from flagscale.errors import DataError
from flagscale.metrics.jsonl import read_records
from flagscale.metrics.loggers import JsonlLogger
from flagscale.metrics.plot import read_metrics
from flagscale.trace.reports import recorded_losses, report_path

RECORDS = [{"iteration": i, "loss": 5.0 - i} for i in (1, 2, 3)]
TORN = '{"iteration": 4, "lo'  # a kill -9 or a full disk in the middle of a write


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_torn_last_line_is_dropped_with_a_note_naming_the_file(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", [*map(json.dumps, RECORDS), TORN])
    with pytest.warns(UserWarning, match=rf"{path}: dropped line 4, cut short"):
        assert read_records(path, "iteration") == RECORDS
    with pytest.warns(UserWarning, match=rf"{path}: dropped line 4"):
        assert read_metrics(path) == RECORDS


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", [json.dumps(RECORDS[0]), TORN,
                                               json.dumps(RECORDS[1])])
    with pytest.raises(DataError, match=rf"{path}, line 2: not a JSON record .* Fix or delete"):
        read_records(path, "iteration")
    path = _write(tmp_path / "metrics.jsonl", [json.dumps(RECORDS[0]), "[1, 2]",
                                               json.dumps(RECORDS[1])])
    with pytest.raises(DataError, match=rf"{path}, line 2: not a record with an integer "
                                        rf"'iteration'"):
        read_metrics(path)


def test_a_resume_after_a_torn_line_keeps_one_clean_history(tmp_path):
    # Resuming from iteration 2: records past it are dropped, the torn line with them, and the
    # file is appended to cleanly.
    path = _write(tmp_path / "metrics.jsonl", [*map(json.dumps, RECORDS), TORN])
    logger = JsonlLogger(path)
    with pytest.warns(UserWarning, match=rf"{path}: dropped line 4"):
        logger.open(2)
    logger.write({"iteration": 3, "loss": 1.5})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        *RECORDS[:2], {"iteration": 3, "loss": 1.5}]


def test_trace_reports_are_read_the_same_way(tmp_path):
    path = report_path(tmp_path, 7)
    path.parent.mkdir()
    _write(path, [json.dumps({"global_sample": 3, "loss": 2.5}), TORN])
    with pytest.warns(UserWarning, match=rf"{path}: dropped line 2"):
        assert recorded_losses(tmp_path, 7) == {3: 2.5}

"""The ``flagscale preprocess`` and ``flagscale data inspect`` commands as a user runs them."""

from __future__ import annotations

import json

import pytest

from flagscale.cli.main import main
from flagscale.data import default_tokenizer_path


def test_preprocess_then_inspect(tmp_path, inputs, capsys):
    files, expected, rejections = inputs
    prefix = tmp_path / "ds"
    code = main(["preprocess", "--input", *map(str, files), "--output-prefix", str(prefix),
                 "--tokenizer", str(default_tokenizer_path()), "--workers", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0
    assert f"{len(expected):,} documents" in err
    assert f"{len(rejections):,} records rejected" in err
    assert f"{files[0]}:4: invalid JSON" in err
    for ext in (".bin", ".idx", ".prov.npy", ".prov.json", ".rejected.jsonl"):
        assert (tmp_path / f"ds{ext}").is_file()

    path, line, text = expected[1]
    assert main(["data", "inspect", str(prefix), "--document", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(expected):,} documents" in out
    assert f"{path.resolve()}:{line}" in out
    assert text in out and "histogram" in out

    assert main(["data", "inspect", str(prefix), "--document", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["document"]["text"] == text and info["document"]["line"] == line
    assert json.loads(info["document"]["source_line"])["text"] == text


def test_user_errors_are_one_paragraph_without_traceback(tmp_path, inputs, capsys):
    files, _, _ = inputs
    common = ["--output-prefix", str(tmp_path / "ds"), "--tokenizer",
              str(default_tokenizer_path()), "--quiet"]
    assert main(["preprocess", "--input", str(files[0]), "--strict", *common]) == 1
    err = capsys.readouterr().err
    assert f"{files[0]}:4: invalid JSON" in err and "Traceback" not in err
    assert main(["preprocess", "--input", str(tmp_path / "none.jsonl"), *common]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 1
    assert "flagscale preprocess" in capsys.readouterr().err


def test_help(capsys):
    for command in (["preprocess", "--help"], ["data", "inspect", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
    assert "--document" in capsys.readouterr().out

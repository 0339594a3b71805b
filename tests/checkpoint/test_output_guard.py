"""The output guard shared by `convert`, `reshard` and `preprocess`, through the real CLI: an
output on top of a training run, its checkpoint or the command's input is refused with the path
named and every file left byte for byte; --overwrite replaces only the command's own earlier
output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flagscale.checkpoint.output import MARKER, read_marker
from flagscale.cli.main import main
from tests.dist import run_cli


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_corpus, tiny_tokenizer) -> Path:
    """A real two-iteration training run with a checkpoint at iteration 2."""
    tmp = tmp_path_factory.mktemp("guard")
    cfg = {"model": {"preset": "tiny"},
           "train": {"micro_batch_size": 2, "global_batch_size": 2, "seq_length": 32,
                     "iterations": 2, "log_interval": 1},
           "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer},
           "checkpoint": {"save_interval": 2},
           "run": {"dir": str(tmp / "run")}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("train", tmp / "run.yaml", "--nproc", "1")
    run = tmp / "run"
    assert (run / "checkpoints" / "iter_0000002" / "metadata.json").is_file()
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()
    return run


@pytest.mark.parametrize("input, output, message", [
    ("checkpoints", ".", "overlaps --input {run}/checkpoints"),
    ("checkpoints/iter_0000002", "checkpoints/iter_0000002", "overlaps --input"),
    ("checkpoints", "checkpoints/iter_0000002", "overlaps --input"),
    ("checkpoints/iter_0000002", "hf", "lies inside {run}, which is a run directory"),
], ids=["output-is-run-dir", "output-is-input-iter", "output-inside-input", "output-inside-run"])
def test_convert_refuses_a_run_or_its_checkpoint_and_leaves_it_intact(run_dir, input, output,
                                                                      message):
    before = _snapshot(run_dir)
    out = (run_dir / output).resolve()
    proc = run_cli("convert", "mcore-to-hf", "--input", run_dir / input, "--output", out,
                   "--overwrite", "--skip-validation", check=False)
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    assert f"--output {out} " in proc.stderr and message.format(run=run_dir) in proc.stderr
    assert _snapshot(run_dir) == before
    assert not [p for p in run_dir.parent.rglob(".*partial-*")]


def test_overwrite_replaces_only_the_commands_own_output(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    def export(output: Path) -> list[str]:
        return ["convert", "mcore-to-hf", "--input", str(run_dir), "--output", str(output),
                "--skip-validation"]

    args = export(out)
    assert main(args) == 0
    assert read_marker(out)["command"] == "convert mcore-to-hf"
    first = _snapshot(out)
    assert main(args) == 1
    assert "earlier `flagscale convert mcore-to-hf` output). Pass --overwrite" in \
        capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert _snapshot(out) == first  # the same export again, complete

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "config.json").write_text("{}")
    assert main(export(foreign) + ["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"Output directory {foreign} is not empty and it has no {MARKER}" in err
    assert _snapshot(foreign) == {"config.json": b"{}", "notes.txt": b"mine"}

    # Another command's output is not this command's to replace.
    other = tmp_path / "hf_b"
    assert main(export(other)) == 0
    second = _snapshot(other)
    capsys.readouterr()
    assert main(["convert", "hf-to-mcore", "--input", str(out), "--output", str(other),
                 "--overwrite"]) == 1
    assert "`flagscale convert mcore-to-hf` wrote it" in capsys.readouterr().err
    assert _snapshot(other) == second


def test_reshard_refuses_the_run_directory(run_dir):
    before = _snapshot(run_dir)
    proc = run_cli("reshard", "--input", run_dir / "checkpoints", "--output", run_dir,
                   "--overwrite", "--dp", "1", check=False)
    assert proc.returncode == 1
    assert f"--output {run_dir} overlaps --input {run_dir / 'checkpoints'}" in proc.stderr
    assert _snapshot(run_dir) == before


def test_preprocess_refuses_a_run_directory_its_input_and_foreign_files(run_dir, tmp_path, capsys,
                                                                       tiny_tokenizer):
    before = _snapshot(run_dir)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "hello world"}) + "\n")
    common = ["preprocess", "--tokenizer", tiny_tokenizer, "--quiet"]
    assert main(common + ["--input", str(docs), "--output-prefix", str(run_dir / "data")]) == 1
    assert f"lies inside {run_dir}, which is a run directory" in capsys.readouterr().err
    assert _snapshot(run_dir) == before

    clash = tmp_path / "d.rejected.jsonl"
    clash.write_bytes(docs.read_bytes())
    assert main(common + ["--input", str(clash), "--output-prefix", str(tmp_path / "d")]) == 1
    assert f"--output-prefix {tmp_path / 'd.rejected.jsonl'} overlaps --input {clash}" in \
        capsys.readouterr().err
    assert clash.read_bytes() == docs.read_bytes()

    (tmp_path / "m.bin").write_bytes(b"megatron-lm data")
    assert main(common + ["--input", str(docs), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "are not an earlier `flagscale preprocess` output" in capsys.readouterr().err
    assert (tmp_path / "m.bin").read_bytes() == b"megatron-lm data"

    # An earlier dataset of preprocess is rebuilt in place, as `make demo` does on every run.
    assert main(common + ["--input", str(docs), "--output-prefix", str(tmp_path / "ok")]) == 0
    assert main(common + ["--input", str(docs), "--output-prefix", str(tmp_path / "ok")]) == 0

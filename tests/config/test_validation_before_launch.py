"""Bad values a user types are refused by `flagscale train` before any process starts, with the
key named, whether or not --dry-run is given; none of them creates the run directory. Each of
these once passed --dry-run and then crashed in the workers, or trained silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flagscale.cli.main import main


def _truncated_copy(corpus: str, tmp_path: Path) -> str:
    prefix = tmp_path / "cut" / "corpus"
    prefix.parent.mkdir()
    for path in Path(corpus).parent.glob(Path(corpus).name + ".*"):
        shutil.copy(path, prefix.parent / path.name)
    idx = prefix.with_name("corpus.idx")
    idx.write_bytes(idx.read_bytes()[:-100])
    return str(prefix)


CASES = {
    "split": (["data.split=abc"], "data.split='abc'"),
    "query-groups": (["model.num_query_groups=-2"], "model.num_query_groups"),
    "lr": (["train.lr=-1"], "train.lr (-1.0)"),
    "seq-length": (["train.seq_length=512"],
                   "train.seq_length (512) > model.max_position_embeddings (256)"),
    "nproc": (["--nproc", "0"], "--nproc"),
    "vpp": (["parallel.pp=2", "parallel.vpp=-3"], "parallel.vpp"),
    "truncated-idx": (["data.paths=[{cut}]"], "{cut}.idx is"),
    "no-tokenizer": (["data.tokenizer=null"], "data.tokenizer is unset, but dataset"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
@pytest.mark.parametrize("case", CASES)
def test_bad_value_is_refused_before_launch(case, dry_run, tmp_path, capsys, tiny_corpus,
                                            tiny_tokenizer):
    args, message = CASES[case]
    cut = _truncated_copy(tiny_corpus, tmp_path) if case == "truncated-idx" else None
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "seq_length": 64,
                  "iterations": 2},
        "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer},
        "run": {"dir": str(run_dir)}}))
    argv = ["train", str(config), *(a.format(cut=cut) for a in args)]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith("flagscale train: error: ") and message.format(cut=cut) in err, err
    assert "Traceback" not in err
    assert not run_dir.exists()

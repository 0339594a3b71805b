"""The README's command lines run as written after `make demo`: each parses, every command that
trains passes `--dry-run`, the planning and launch commands run, and the paths they read are the
ones the Makefile's demo writes (so `runs/demo` vs `runs/tiny` cannot drift apart again).

Running every command in full takes minutes (training, resharding, export); the demo's own
commands are what `make demo` runs, so here each README line is checked as far as it can be
without the demo's outputs.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from flagscale.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text()
OUTSIDE = ("docs.jsonl", "tokenizer.model", "hf/llama3_8b")
"""Files the README names as the user's own (the contract excepts them)."""


def _make_var(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", MAKEFILE, re.M).group(1)


DEMO_RUN, DEMO_HF = _make_var("DEMO"), _make_var("HF")


def readme_commands() -> list[list[str]]:
    """Every ``flagscale ...`` line of the README's bash blocks, comments stripped, as argv."""
    text = (ROOT / "README.md").read_text()
    lines = [line.split(" #")[0].strip()
             for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("flagscale ")]


COMMANDS = readme_commands()


def test_the_readme_shows_every_command():
    assert {argv[1] for argv in COMMANDS} >= {"preprocess", "train", "convert", "trace",
                                              "reshard", "flops", "plan", "launch"}
    # make demo trains DEMO_RUN and exports to DEMO_HF, the names the checks below rely on.
    assert "--output $(HF) --overwrite" in MAKEFILE and "run.dir=$(DEMO)" in MAKEFILE


@pytest.fixture(scope="module")
def demo_checkout(tmp_path_factory, tiny_corpus) -> Path:
    """A working directory laid out as a checkout after `make demo`'s preprocessing step: the
    examples, the bundled tokenizer and `data/tiny/corpus`."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("examples", "flagscale"):
        (root / name).symlink_to(ROOT / name)
    (root / "data" / "tiny").mkdir(parents=True)
    for path in Path(tiny_corpus).parent.glob("corpus.*"):
        shutil.copy(path, root / "data" / "tiny" / path.name)
    return root


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[1:4]))
def test_readme_command_runs_as_written(argv, demo_checkout, monkeypatch, capsys):
    args, extra = build_parser().parse_known_args(argv[1:])
    assert callable(getattr(args, "func", None)) and all("=" in e for e in extra), extra
    for token in argv[2:]:
        value = token.split("=", 1)[1] if token.startswith("run.dir=") else token
        if token.startswith("run.dir="):
            # A README run of its own: never the demo's, which it would resume instead.
            assert value != DEMO_RUN, argv
        elif value.startswith("runs/"):
            assert value.startswith(DEMO_RUN + "/"), f"{value} is not under make demo's {DEMO_RUN}"
    output = getattr(args, "output", None)
    if output and not args.overwrite:
        assert output not in (DEMO_HF, DEMO_RUN), f"{output} exists after make demo"
    monkeypatch.chdir(demo_checkout)
    if argv[1] == "train":
        # Trains: checked up to the launch (config, layout, data, tokenizer), not run.
        extra = [] if "--keys" in argv else ["--dry-run"]
        assert main(argv[1:] + extra) == 0, capsys.readouterr().err
    elif argv[1] in ("flops", "plan", "launch"):
        assert main(argv[1:]) == 0, capsys.readouterr().err
    else:
        paths = [getattr(args, name, None) for name in ("input", "config")]
        for path in [p for group in paths if group for p in
                     (group if isinstance(group, list) else [group])]:
            assert path in OUTSIDE or path.startswith(DEMO_RUN + "/"), path

"""``trace.on_spike``: a bad batch makes a real 2-process run rewind to its newest checkpoint (or,
for a non-finite step, retry the iteration) and train on without that batch, exactly as a run
configured to skip it; a non-finite gradient never reaches the weights in any mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from flagscale.checkpoint import read_run_state
from flagscale.config import load_config, validate
from flagscale.errors import ConfigError
from flagscale.data.datasets import batch_index
from flagscale.trace import open_tracer, trace_iterations
from flagscale.train.callbacks import Callback
from tests.dist import run_distributed


class PoisonedBatch(Callback):
    """Stands in for a batch of bad documents: whenever global batch ``batch`` is trained on,
    the gradient of one weight turns NaN. Records whether the weights after that step equal
    those before it."""

    priority = 1000  # its post_step runs before the spike callback can discard the step

    def __init__(self, batch: int):
        self.batch = batch
        self.before = None
        self.weights_kept: list[bool] = []

    def pre_step(self, iteration):
        trainer = self.trainer
        if batch_index(trainer.cfg, iteration - 1, trainer.skipped_batches) != self.batch:
            return
        params = list(trainer.model[0].parameters())
        self.before = [p.detach().clone() for p in params]
        handle = []
        handle.append(params[0].register_hook(lambda g: (handle.pop().remove(), g * float("nan"))[1]))

    def post_step(self, step):
        if self.before is not None:
            after = list(self.trainer.model[0].parameters())
            self.weights_kept.append(all(torch.equal(a, b) for a, b in zip(after, self.before)))
            self.before = None


def _worker(config: str, poison: int) -> dict:
    from flagscale.train.trainer import Trainer

    poisoned = PoisonedBatch(poison)
    trainer = Trainer(load_config(config), callbacks=[poisoned])
    trainer.fit()
    return {"skipped": trainer.skipped_batches, "weights_kept": poisoned.weights_kept}


def _config(tmp_path: Path, corpus: str, tokenizer: str, name: str, **sections) -> Path:
    cfg = {"model": {"preset": "tiny", "params_dtype": "fp32"}, "parallel": {"dp": 2},
           "train": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 32,
                     "iterations": 6, "log_interval": 1, "seed": 7, "lr": 1e-3,
                     "lr_decay_style": "constant"},
           "data": {"paths": [corpus], "tokenizer": tokenizer},
           "checkpoint": {"save_interval": 2},
           "trace": {"spike_factor": 100.0},
           "run": {"dir": str(tmp_path / name)}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rewind_skips_the_bad_batch_like_a_run_configured_to_skip_it(tmp_path, tiny_corpus,
                                                                     tiny_tokenizer):
    # Batch 3 (iteration 4) is bad: the run rewinds to its checkpoint of iteration 2 and trains
    # iterations 3..6 on batches 2, 4, 5, 6.
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer, "rewound",
                     trace={"on_spike": "rewind", "max_rewinds": 1})
    result, _ = run_distributed(_worker, 2, str(config), 3)
    assert result["skipped"] == [4]
    run_dir = tmp_path / "rewound"
    records = _records(run_dir)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert records[3]["rewind"] == {"from": 4, "to": 2, "skipped": [4]}
    assert records[3]["grad_norm"] is None

    # The report names exactly the documents of batch 3: those iteration 4 reads without skips.
    report = [json.loads(x) for x in (run_dir / "traces" / "iter_0000004.jsonl").open()]
    with open_tracer(load_config(config)) as tracer:
        tracer.skipped = []  # the run as it went before the rewind
        expected = tracer.records(4)
    assert [(r["global_sample"], r["source"], r["line"]) for r in report] == \
        [(r["global_sample"], r["source"], r["line"]) for r in expected]
    assert {r["global_sample"] for r in report} == set(range(24, 32))
    assert all(r["source"] and r["line"] >= 1 for r in report)
    # `flagscale trace` reads the skip from the checkpoint: iteration 4 trained on batch 4.
    assert {r["global_sample"] for r in trace_iterations(load_config(config), 4)} == \
        set(range(32, 40))

    # Every later checkpoint keeps the skipped batch, so a resume keeps skipping it.
    final = read_run_state(run_dir / "checkpoints" / "iter_0000006")
    assert final["callbacks"]["SpikeReportCallback"]["skipped_batches"] == [4]

    # The same checkpoint resumed by a run told to skip batch 3 trains identically.
    reference = _config(tmp_path, tiny_corpus, tiny_tokenizer, "reference",
                        data={"skip_iterations": [4]}, checkpoint={
                            "save_interval": 0,
                            "load": str(run_dir / "checkpoints" / "iter_0000002")})
    run_distributed(_worker, 2, str(reference), 3)
    after = {r["iteration"]: r["loss"] for r in _records(tmp_path / "reference")}
    assert sorted(after) == [3, 4, 5, 6]
    assert [r["loss"] for r in records[4:]] == [after[i] for i in (3, 4, 5, 6)]


@pytest.mark.parametrize("on_spike, distributed_optimizer", [("skip", True), ("report", False)])
def test_a_nan_gradient_never_reaches_the_weights(tmp_path, tiny_corpus, tiny_tokenizer,
                                                  on_spike, distributed_optimizer):
    # skip: megatron-core's distributed optimizer drops the update and iteration 3 is retried on
    # batch 3. report: the fp32 optimizer (no distributed optimizer) has no check of its own;
    # the trainer's keeps the weights, and the run trains on.
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer, "run", train={"iterations": 4},
                     parallel={"distributed_optimizer": distributed_optimizer},
                     checkpoint={"save_interval": 0}, trace={"on_spike": on_spike})
    result, _ = run_distributed(_worker, 2, str(config), 2)
    assert result["weights_kept"] == [True]
    records = _records(tmp_path / "run")
    assert records[2]["grad_norm"] is None
    if on_spike == "skip":
        assert result["skipped"] == [3]
        assert [r["iteration"] for r in records] == [1, 2, 3, 3, 4]
        assert records[2]["rewind"] == {"from": 3, "to": 2, "skipped": [3]}
    else:
        assert result["skipped"] == []
        assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert all(r["grad_norm"] is not None for r in records[3:])


def test_on_spike_settings_are_checked_before_launch():
    tiny = ["model.preset=tiny", "train.seq_length=128"]
    cfg = load_config(overrides=[*tiny, "trace.on_spike=rewind"])
    with pytest.raises(ConfigError, match="checkpoint.save_interval is 0"):
        validate(cfg, 1, check_paths=False)
    with pytest.raises(ConfigError, match="trace.on_spike='undo' is not one of report, skip"):
        validate(load_config(overrides=[*tiny, "trace.on_spike=undo"]), 1, check_paths=False)
    with pytest.raises(ConfigError, match="trace.max_rewinds must be >= 0, got -1"):
        validate(load_config(overrides=[*tiny, "trace.max_rewinds=-1"]), 1, check_paths=False)

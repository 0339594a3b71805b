"""Batch-size ramp-up (``train.rampup_batch_size``): megatron-core's microbatch calculator sizes
every step, and everything that counts batches follows it: the data each step reads, consumed
samples, the LR schedule (in samples), resume, the trace and the validation before launch.

The ramp [2, 2, 16] to a global batch of 8 gives steps of 2, 2, 2, 4, 4, 6 and then 8 sequences:
megatron-core's calculator adds 2 every 16/3 samples, counted before each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flagscale.config import load_config, validate
from flagscale.data.datasets import BatchSchedule, batch_index, build_datasets, microbatches
from flagscale.errors import ConfigError
from flagscale.trace import trace_iterations
from tests.dist import run_cli, tiny_config

RAMP = [2, 2, 16]
SIZES = [2, 2, 2, 4, 4, 6, 8]
ITERATIONS = len(SIZES)
LR, MIN_LR, WARMUP = 2e-3, 2e-4, 2


def _config(tmp: Path, corpus: str, tokenizer: str, name: str, **sections) -> Path:
    train = {"micro_batch_size": 1, "global_batch_size": 8, "iterations": ITERATIONS,
             "rampup_batch_size": RAMP, "lr": LR, "min_lr": MIN_LR,
             "warmup_iterations": WARMUP, "lr_decay_style": "linear",
             **sections.pop("train", {})}
    return tiny_config(tmp / f"{name}.yaml", corpus, tokenizer, tmp / name, train=train,
                       **sections)


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines)}


def _assert_close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for it in expected:
        rel = abs(actual[it] - expected[it]) / abs(expected[it])
        assert rel <= rtol, f"{what}: iteration {it}: {actual[it]} vs {expected[it]} ({rel:.1e})"


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    """One process through the ramp, saving in the middle of it (after iteration 4)."""
    tmp = tmp_path_factory.mktemp("rampup")
    run_cli("train", _config(tmp, tiny_corpus, tiny_tokenizer, "single",
                             checkpoint={"save_interval": 4}), "--nproc", "1")
    return tmp / "single"


def test_steps_follow_the_ramp_in_batch_samples_and_lr(single):
    metrics = _metrics(single)
    assert [metrics[i]["global_batch_size"] for i in range(1, ITERATIONS + 1)] == SIZES
    assert [metrics[i]["consumed_samples"] for i in range(1, ITERATIONS + 1)] == \
        list(np.cumsum(SIZES))
    # The schedule counts samples: warmup ends after the samples of the first WARMUP steps and
    # the linear decay after those of all steps. `lr` is the rate the step trained with.
    samples = [0, *np.cumsum(SIZES)]
    warmup, decay = samples[WARMUP], samples[ITERATIONS]
    for i in range(1, ITERATIONS + 1):
        done = samples[i - 1]
        expected = (LR * done / warmup if done <= warmup
                    else LR - (LR - MIN_LR) * (done - warmup) / (decay - warmup))
        assert metrics[i]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12), i
    assert metrics[ITERATIONS]["loss"] < metrics[1]["loss"]
    # A step's tokens are its own batch's: tokens/s * step time * world = batch * seq.
    last = metrics[ITERATIONS]
    assert last["tokens_per_sec_per_gpu"] * last["step_time_s"] == pytest.approx(8 * 32)


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"dp": 2}], ids=["tp2", "dp2"])
def test_two_process_layouts_match_one_process_through_the_ramp(parallel, single, tmp_path,
                                                                 tiny_corpus, tiny_tokenizer):
    run_cli("train", _config(tmp_path, tiny_corpus, tiny_tokenizer, "run", parallel=parallel),
            "--nproc", "2")
    expected, metrics = _metrics(single), _metrics(tmp_path / "run")
    _assert_close({i: r["loss"] for i, r in metrics.items()},
                  {i: r["loss"] for i, r in expected.items()}, 1e-4, f"layout {parallel}")
    assert [metrics[i]["global_batch_size"] for i in range(1, ITERATIONS + 1)] == SIZES


def test_resume_in_the_middle_of_the_ramp_is_exact(single, tmp_path, tiny_corpus,
                                                   tiny_tokenizer):
    checkpoint = single / "checkpoints" / "iter_0000004"
    assert checkpoint.is_dir()
    run_cli("train", _config(tmp_path, tiny_corpus, tiny_tokenizer, "resumed",
                             checkpoint={"load": str(checkpoint)}), "--nproc", "1")
    expected, resumed = _metrics(single), _metrics(tmp_path / "resumed")
    assert sorted(resumed) == list(range(5, ITERATIONS + 1))
    for key in ("loss", "grad_norm", "lr"):
        _assert_close({i: r[key] for i, r in resumed.items()},
                      {i: expected[i][key] for i in resumed}, 1e-6, f"resumed {key}")
    for key in ("global_batch_size", "consumed_samples"):
        assert [resumed[i][key] for i in resumed] == [expected[i][key] for i in resumed]


def test_a_skipped_batch_inside_the_ramp_moves_no_other_batch(tmp_path, tiny_corpus,
                                                             tiny_tokenizer):
    from tests.dist import run_distributed
    from tests.train.test_rewind import _worker

    # Batch 3 (iteration 4, 4 sequences) gets a NaN gradient: trace.on_spike=skip retries
    # iteration 4 on batch 4, which keeps its own size; the update was dropped, so neither the
    # LR schedule nor consumed_samples count the discarded step.
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer, "skip", parallel={"dp": 2},
                     trace={"on_spike": "skip"})
    result, _ = run_distributed(_worker, 2, str(config), 3)
    assert result == {"skipped": [4], "weights_kept": [True]}
    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").open()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 4, 5, 6, 7]
    assert records[3]["rewind"] == {"from": 4, "to": 3, "skipped": [4]}
    assert [r["global_batch_size"] for r in records] == [2, 2, 2, 4, 4, 6, 8, 8]
    assert [r["consumed_samples"] for r in records] == [2, 4, 6, 10, 10, 16, 24, 32]
    assert records[4]["lr"] == records[3]["lr"]


def test_a_rewind_inside_the_ramp_resumes_the_ramp_from_the_checkpoint(tmp_path, tiny_corpus,
                                                                      tiny_tokenizer):
    from tests.dist import run_distributed
    from tests.train.test_rewind import _worker

    # Batch 3 (iteration 4, 4 sequences) is bad: the run rewinds to its checkpoint of iteration 2
    # (consumed 4), trains iteration 3 on batch 2 again and iteration 4 on batch 4; batch 4 keeps
    # the size of its place in the data (4), and every later batch too.
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer, "rewind", parallel={"dp": 2},
                     checkpoint={"save_interval": 2},
                     trace={"on_spike": "rewind", "max_rewinds": 1, "spike_factor": 100.0})
    result, _ = run_distributed(_worker, 2, str(config), 3)
    assert result["skipped"] == [4]
    records = [json.loads(x) for x in (tmp_path / "rewind" / "metrics.jsonl").open()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert records[3]["rewind"] == {"from": 4, "to": 2, "skipped": [4]}
    assert [r["global_batch_size"] for r in records] == [2, 2, 2, 4, 2, 4, 6, 8, 8]
    assert [r["consumed_samples"] for r in records] == [2, 4, 6, 10, 6, 10, 16, 24, 32]
    # The LR schedule counts samples: after the rewind it is where the checkpoint left it.
    assert records[4]["lr"] == records[2]["lr"]


def test_trace_inside_the_ramp_rebuilds_the_tokens_fed(single, tmp_path, tiny_corpus,
                                                       tiny_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg = load_config(single / "config.yaml")
    layout = validate(cfg, world_size=1)
    sizes = [_metrics(single)[i]["global_batch_size"] for i in range(1, ITERATIONS + 1)]
    dataset, _ = build_datasets(cfg, layout, eod=3, cache_dir=tmp_path / "cache")
    indexed = IndexedDataset(tiny_corpus)
    for iteration in (4, 6):  # batches of 4 and 6 sequences
        records = list(trace_iterations(cfg, iteration, run_dir=single))
        rows: dict[int, list[dict]] = {}
        for r in records:
            rows.setdefault(r["global_sample"], []).append(r)
        # The iteration's batch starts at the sum of the batch sizes the trainer stepped before.
        first = sum(sizes[:iteration - 1])
        assert sorted(rows) == list(range(first, first + sizes[iteration - 1]))
        fed = [mb for mb in microbatches(dataset, cfg, layout, 0, batch_index(cfg, iteration - 1),
                                         torch.device("cpu"))]
        assert len(fed) * cfg.train.micro_batch_size == sizes[iteration - 1]
        for m, batch in enumerate(fed):
            spans = rows[first + m]
            assert all(s["microbatch"] == m and s["iteration"] == iteration for s in spans)
            tokens = np.concatenate([
                indexed.get(s["document"], offset=s["doc_offset"],
                            length=s["token_end"] - s["token_start"]) for s in spans])
            assert np.array_equal(tokens, torch.cat([batch["tokens"][0],
                                                     batch["labels"][0][-1:]]).numpy())


def test_batch_schedule_is_megatron_cores_calculator():
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, get_current_global_batch_size, get_num_microbatches,
        init_num_microbatches_calculator, update_num_microbatches)

    # The Aquila2-34B recipe: 32 -> 1024 by 32 over 2,000,000 samples, micro batch 1, dp 32.
    cfg = load_config(overrides=["model.preset=tiny", "train.micro_batch_size=1",
                                 "train.global_batch_size=1024",
                                 "train.rampup_batch_size=[32,32,2000000]"])
    schedule = BatchSchedule.for_training(cfg, 32)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, [32, 32, 2000000], 1024, 1, 32)
    try:
        for batch in [*range(0, 9000, 7), 20000]:
            update_num_microbatches(schedule.start(batch))
            assert schedule.size(batch) == get_current_global_batch_size()
            assert schedule.num_microbatches(batch) == get_num_microbatches()
            assert schedule.start(batch + 1) == schedule.start(batch) + schedule.size(batch)
    finally:
        destroy_num_microbatches_calculator()
    assert schedule.size(0) == 32 and schedule.size(20000) == 1024


def test_a_ramp_in_whole_increments_validates():
    cfg = load_config(overrides=["model.preset=tiny", "train.micro_batch_size=1",
                                 "train.global_batch_size=8", "train.rampup_batch_size=[2,3,90]"])
    assert validate(cfg, 1, check_paths=False).num_microbatches == 8
    assert [BatchSchedule.for_training(cfg, 1).size(b) for b in range(6)] == [2, 2, 2, 2, 2, 2]


def test_dry_run_names_the_ramp_and_its_length(tmp_path, tiny_corpus, tiny_tokenizer):
    config = _config(tmp_path, tiny_corpus, tiny_tokenizer, "dry")
    out = run_cli("train", config, "--dry-run", "--nproc", "2").stdout
    ramp = BatchSchedule.for_training(load_config(str(config)), 2)
    assert (f"# batch-size ramp-up from 2 to 8 sequences by 2 over 16 samples: the first "
            f"{ramp.ramp_batches} steps ramp up (microbatches per rank at first: 1)") in out
    assert not (tmp_path / "dry").exists()  # a dry run creates no run directory


@pytest.mark.parametrize("ramp, world, extra, message", [
    ([3, 5, 100], 2, [], "start (3) % (micro_batch_size (1) * dp (2)) = 1"),
    ([4, 2, 100], 4, [], "increment (2) % (micro_batch_size (1) * dp (4)) = 2"),
    ([2, 4, 100], 1, [], "(global_batch_size 8 - start 2) % increment 4 = 2"),
    ([8, 2, 100], 1, [], "start (8) must be below train.global_batch_size (8)"),
    ([16, 2, 100], 1, [], "start (16) must be below train.global_batch_size (8)"),
    ([2, 2, 0], 1, [], "samples (0) must each be at least 1"),
    ([2, 2, -5], 1, [], "samples (-5) must each be at least 1"),
    ([2, 2], 1, [], "expected three integers [start, increment, samples]"),
    # The interleaved schedule needs a multiple of pp microbatches in every step.
    ([2, 3, 100], 2, ["parallel.pp=2", "parallel.vpp=2"],
     "increment (3) is 3 microbatches per data-parallel rank"),
])
def test_bad_ramps_are_refused_before_launch_with_the_arithmetic(ramp, world, extra, message):
    cfg = load_config(overrides=["model.preset=tiny", "train.micro_batch_size=1",
                                 "train.global_batch_size=8",
                                 f"train.rampup_batch_size={json.dumps(ramp)}", *extra])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world, check_paths=False)
    assert message in str(err.value)
    assert "train.rampup_batch_size" in str(err.value)

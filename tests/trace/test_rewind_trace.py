"""A rewind that skips the batches around a spike (``trace.rewind_skip_around``): its report names
the documents of every skipped batch, training steps over exactly those batches, and ``flagscale
trace`` of an iteration after the rewind, reading the skips from the checkpoint, rebuilds the
tokens the run really fed.

One real 2-process run (dp=2, checkpoints at 2, 4, 6): batch 3 is poisoned, so iteration 4
spikes, the run rewinds to iteration 2 and skips batches 2, 3 and 4 (``data.skip_iterations``
entries 3, 4, 5; none before the checkpoint's batch 2), then trains iterations 3..6 on batches
5..8. The tokens each rank fed its model are recorded at the embedding.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from flagscale.config import load_config
from flagscale.trace import open_tracer, trace_iterations
from flagscale.train.callbacks import Callback
from tests.dist import run_distributed
from tests.trace.test_records import _rows, _span_tokens
from tests.train.test_rewind import PoisonedBatch, _config, _records

GBS, SEQ = 8, 32


class FedTokens(Callback):
    """Records the input ids of every microbatch this rank's model embedded, per step, in the
    order the steps ran (a rewound iteration appears twice)."""

    def __init__(self):
        self.steps: list[tuple[int, list]] = []

    def pre_train(self):
        embedding = self.trainer.model[0].module.embedding
        embedding.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.steps[-1][1].append(input_ids.detach().cpu().clone())

    def pre_step(self, iteration):
        self.steps.append((iteration, []))


def _worker(config: str, poison: int) -> dict:
    from megatron.core import parallel_state

    from flagscale.train.trainer import Trainer

    fed = FedTokens()
    trainer = Trainer(load_config(config), callbacks=[PoisonedBatch(poison), fed])
    trainer.fit()
    return {"skipped": trainer.skipped_batches, "fed": fed.steps,
            "dp_rank": parallel_state.get_data_parallel_rank()}


@pytest.fixture(scope="module")
def rewound(tmp_path_factory, tiny_corpus, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("rewind_around")
    config = _config(tmp, tiny_corpus, tiny_tokenizer, "run",
                     trace={"on_spike": "rewind", "max_rewinds": 1, "rewind_skip_around": 1})
    results = run_distributed(_worker, 2, str(config), 3)
    run_dir = tmp / "run"
    return {"run_dir": run_dir, "results": results,
            "config": load_config(run_dir / "config.yaml")}


def _assert_rebuild(records, steps_by_rank, label):
    """Each (iteration, microbatch, dp_rank, row) of ``records`` spans exactly the tokens that
    rank fed in that row (``steps_by_rank[dp_rank][iteration]``: its microbatches)."""
    rows, indexed = _rows(records), {}
    assert len(rows) == len({r["iteration"] for r in records}) * GBS, label
    for (it, m, dp_rank, j), spans in rows.items():
        traced = np.concatenate([_span_tokens(s, indexed) for s in spans])[:SEQ]
        fed = steps_by_rank[dp_rank][it][m][j].numpy()
        assert np.array_equal(traced, fed), f"{label}: iteration {it} microbatch {m} " \
                                            f"dp rank {dp_rank} row {j}"


def _names(record) -> tuple:
    return record["global_sample"], record["source"], record["line"], record["token_start"]


def _steps(rewound, which: str) -> dict[int, dict[int, list]]:
    """Per DP rank, each iteration's fed microbatches from its ``first`` or ``last`` run."""
    out = {}
    for result in rewound["results"]:
        steps = result["fed"] if which == "last" else reversed(result["fed"])
        out[result["dp_rank"]] = {it: mbs for it, mbs in steps}
    return out


def test_report_names_the_documents_of_every_skipped_batch(rewound):
    run_dir = rewound["run_dir"]
    assert [r["skipped"] for r in rewound["results"]] == [[3, 4, 5]] * 2
    assert [r["iteration"] for r in _records(run_dir)] == [1, 2, 3, 4, 3, 4, 5, 6]
    report = [json.loads(x) for x in (run_dir / "traces" / "iter_0000004.jsonl").open()]
    by_batch = defaultdict(list)
    for record in report:
        by_batch[record["skipped_batch"]].append(record)
    assert sorted(by_batch) == [3, 4, 5]
    # Before the rewind, batch b was (or would have been) read by iteration b + 1: each skipped
    # batch is labelled so, and names exactly that iteration's documents.
    with open_tracer(rewound["config"], run_dir) as tracer:
        tracer.skipped = []  # the run as it went before the rewind
        for entry, records in by_batch.items():
            assert {r["iteration"] for r in records} == {entry}
            assert {r["global_sample"] for r in records} == \
                set(range((entry - 1) * GBS, entry * GBS))
            expected = tracer.records(entry)
            assert [_names(r) for r in records] == [_names(r) for r in expected]
            assert all(r["source"] and r["line"] >= 1 for r in records)
    # Only the spiking batch's rows carry the losses recorded at the spike.
    assert all("loss" in r for r in by_batch[4]) and not any("loss" in r for r in by_batch[3])
    # The two skipped batches that were trained on before the rewind are what iterations 3
    # and 4 fed then.
    first = _steps(rewound, "first")
    _assert_rebuild(by_batch[3] + by_batch[4], first, "report")


def test_trace_after_the_rewind_rebuilds_the_tokens_fed(rewound):
    # Training steps over exactly batches 2, 3 and 4: iterations 3..6 read batches 5..8, and the
    # offline trace (skips read from the latest checkpoint) finds the same.
    records = list(trace_iterations(rewound["config"], 1, 6, run_dir=rewound["run_dir"]))
    batches = {r["iteration"]: r["global_sample"] // GBS for r in records}
    assert batches == {1: 0, 2: 1, 3: 5, 4: 6, 5: 7, 6: 8}
    _assert_rebuild(records, _steps(rewound, "last"), "trace")

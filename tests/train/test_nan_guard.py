"""``train.check_for_nan_in_grad``: a NaN gradient stops a real 2-process run with an error naming
the iteration, before that step's update and before any checkpoint of it."""

from __future__ import annotations

import torch

from flagscale.config import load_config
from tests.dist import run_distributed, tiny_config
from tests.train.test_rewind import PoisonedBatch


def _worker(config: str, poison: int) -> dict:
    from flagscale.train.trainer import NonFiniteGradientError, Trainer

    poisoned = PoisonedBatch(poison)
    trainer = Trainer(load_config(config), callbacks=[poisoned])
    try:
        trainer.fit()
    except NonFiniteGradientError as exc:
        after = list(trainer.model[0].parameters())
        return {"error": str(exc), "iteration": trainer.iteration,
                "weights_kept": all(torch.equal(a, b) for a, b in zip(after, poisoned.before))}
    return {"error": None}


def test_a_nan_gradient_stops_the_run_before_its_update(tmp_path, tiny_corpus, tiny_tokenizer):
    # Batch 2 (iteration 3) poisons a gradient on both ranks; iteration 2 was saved.
    config = tiny_config(tmp_path / "run.yaml", tiny_corpus, tiny_tokenizer, tmp_path / "run",
                         parallel={"dp": 2},
                         train={"iterations": 4, "check_for_nan_in_grad": True},
                         checkpoint={"save_interval": 1})
    results = run_distributed(_worker, 2, str(config), 2)
    for result in results:
        assert result["error"] is not None, "the run trained past a NaN gradient"
        assert result["error"].startswith("Iteration 3: a gradient is not finite")
        assert "the weights are those after iteration 2" in result["error"]
        assert "iter_0000002" in result["error"]
        assert result["iteration"] == 2 and result["weights_kept"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000001", "iter_0000002"]

"""Continued pretraining from `convert hf-to-mcore`: a transformers Llama (GQA, random weights) is
imported at TP=2 and trained on 2 real processes with checkpoint.load pointing at the import. The
first step's loss is transformers' loss on the same batch, and training goes on from there with a
fresh optimizer at iteration 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from flagscale.convert import hf_to_mcore
from flagscale.convert.tokenizer import export_tokenizer
from tests.dist import run_distributed

VOCAB = 4096  # the bundled tokenizer's size, a multiple of 128 * tp: no padding rows, whose
# zero logits would add to megatron-core's softmax and make the losses differ
ITERATIONS = 3


def _hf_llama(path: Path, tokenizer: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         # Wide initial logits: a loss far above its floor, which the first
                         # steps bring down whatever batches they read.
                         initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(path)
    export_tokenizer(tokenizer, path)
    return path


def _train_worker(config: str) -> dict:
    """One rank: train from the import; rank 0 also returns iteration 1's batch."""
    from flagscale.config import load_config
    from flagscale.data.datasets import batch_index, microbatches
    from flagscale.train.trainer import Trainer

    trainer = Trainer(load_config(config))
    start = (trainer.start_iteration, trainer.consumed_samples)
    batch = [{k: v.cpu() for k, v in mb.items()} for mb in microbatches(
        trainer.train_dataset, trainer.cfg, trainer.layout, trainer._dp_rank,
        batch_index(trainer.cfg, 0), trainer.platform.device)]
    trainer.fit()
    return {"start": start, "batch": batch, "iteration": trainer.iteration}


def test_training_from_an_import_at_tp2_starts_at_the_transformers_loss(
        tmp_path, tiny_corpus, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    hf_dir = _hf_llama(tmp_path / "hf", tiny_tokenizer)
    ckpt = hf_to_mcore(hf_dir, tmp_path / "ckpt", tp=2, log=lambda *_: None)
    model = yaml.safe_load((ckpt / "flagscale_config.yaml").read_text())["model"]
    assert model["params_dtype"] == "fp32" and model["num_query_groups"] == 2
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": model, "parallel": {"tp": 2},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "seq_length": 32,
                  "iterations": ITERATIONS, "lr": 1e-2, "warmup_iterations": 0,
                  "log_interval": 1, "seed": 7},
        "data": {"paths": [tiny_corpus], "tokenizer": tiny_tokenizer},
        "checkpoint": {"load": str(ckpt), "save_interval": 0, "save_final": False},
        "run": {"dir": str(tmp_path / "run")}}))

    first, second = run_distributed(_train_worker, 2, str(config))
    # Weights only: a fresh run at iteration 0 that trains every iteration.
    assert first["start"] == second["start"] == (0, 0)
    assert first["iteration"] == ITERATIONS
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert [r["iteration"] for r in records] == list(range(1, ITERATIONS + 1))

    # transformers on the same global batch (both TP ranks read it): the mean token loss.
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True,
                                              torch_dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for mb in first["batch"]:
            assert torch.equal(mb["position_ids"], torch.arange(32).expand_as(mb["tokens"]))
            logits = hf(mb["tokens"]).logits
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), mb["labels"].reshape(-1), reduction="none")
            mask = mb["loss_mask"].reshape(-1).float()
            total += (per_token * mask).sum().item()
            count += mask.sum().item()
    expected = total / count
    assert abs(losses[0] - expected) < 1e-4 * expected, (losses[0], expected)
    # Training proceeds from there with a fresh optimizer.
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

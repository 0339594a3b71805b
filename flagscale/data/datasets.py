"""Training datasets: megatron-core GPT datasets (blended when weighted) over indexed files, and
the one function that decides which global sample each row of each microbatch reads.

The order is fixed and layout-aware: global sample ``g`` of iteration ``it`` is

    g = it * GBS + m * MBS * DP + r * MBS + j      (microbatch m, data-parallel rank r, row j)

where ``it`` is the *batch* index: iteration ``i`` (1-based) normally reads batch ``i - 1``, and
batches named by ``data.skip_iterations`` are stepped over (:func:`batch_index`). So a resume at any
iteration continues exactly, and a trace can name the sample of any row.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

import torch

from flagscale.config import Config, Layout, data_prefixes
from flagscale.errors import DataError


def batch_index(cfg: Config, iteration: int, skipped: Iterable[int] = ()) -> int:
    """The global batch read by 0-based ``iteration``, stepping over ``data.skip_iterations`` and
    ``skipped`` (the batches a run added itself at spikes: ``trace.on_spike``).

    An entry ``k`` retires batch ``k - 1``, the batch iteration ``k`` reads in a run without
    skips: iterations before it are unchanged, later ones shift by one batch per skip. To retire
    the batch ``b`` an iteration read, skip ``b + 1`` (equal to the iteration's number only while
    no earlier batch is skipped).
    """
    retired = sorted({int(k) - 1 for k in (*cfg.data.skip_iterations, *skipped)})
    batch = iteration
    for k in retired:
        if k <= batch:
            batch += 1
    return batch


def train_batches(cfg: Config) -> int:
    """Global batches the train dataset holds: those the run reads, plus one per batch that
    ``trace.on_spike`` may skip on its own (up to ``trace.max_rewinds`` times). Sized up front
    because megatron-core shuffles over the total sample count: a skip added during the run must
    not change the data order, so that a rewound run reads what a run configured with the same
    skips reads."""
    tr = cfg.trace
    reserve = {"report": 0, "skip": tr.max_rewinds,
               "rewind": tr.max_rewinds * (2 * tr.rewind_skip_around + 1)}[tr.on_spike]
    return batch_index(cfg, cfg.train.iterations - 1) + 1 + reserve


def global_sample_index(iteration: int, microbatch: int, dp_rank: int, row: int,
                        micro_batch_size: int, dp: int, global_batch_size: int) -> int:
    """The global sample index read by one row of one microbatch (0-based iteration)."""
    return (iteration * global_batch_size + microbatch * micro_batch_size * dp
            + dp_rank * micro_batch_size + row)


def check_training_data(cfg: Config) -> None:
    """Refuse, before any process starts, data the run cannot use: a missing prefix, a truncated
    index, a dataset built with another tokenizer or with one the config leaves unset, or a
    tokenizer larger than the model's vocabulary."""
    from flagscale.data.provenance import check_dataset, check_index
    from flagscale.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"data.tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but "
                        f"model.vocab_size is {cfg.model.vocab_size}: token ids would fall outside "
                        f"the embedding. Use the model's tokenizer or set model.vocab_size.")
    for _, prefix in data_prefixes(cfg):
        if Path(prefix + ".prov.json").is_file():
            built = check_dataset(prefix, tokenizer).tokenizer
            if tokenizer is None and built.get("path"):
                raise DataError(f"data.tokenizer is unset, but dataset {prefix} was built with "
                                f"tokenizer {built['path']} (vocab size {built['vocab_size']}): "
                                f"without it nothing checks the data against the model, and "
                                f"its checkpoints export without a tokenizer. Set "
                                f"data.tokenizer={built['path']}.")
        elif not Path(prefix + ".idx").is_file():
            check_dataset(prefix)  # raises the missing-files error
        else:
            check_index(prefix)
            warnings.warn(f"{prefix} has no provenance sidecar (it was not written by `flagscale "
                          f"preprocess`): traces will name sample and document ids only.")


def _megatron_tokenizer(vocab_size: int, eod: int):
    # megatron-core reads only these attributes. pad=-1 marks "no padding in pretraining data": a
    # real token id there would silently mask that token's loss. megatron-core serialises
    # unique_identifiers into the description whose hash names its index cache files.
    return SimpleNamespace(vocab_size=vocab_size, eod=eod, pad=-1, unique_identifiers={})


def build_datasets(cfg: Config, layout: Layout, eod: int, cache_dir: Path,
                   valid_samples: int = 0):
    """Build (train, valid) datasets sized for the run; valid is None when not requested.

    Only global rank 0 writes the index caches; the others wait at a barrier and read them.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = data_prefixes(cfg)
    if not prefixes:
        raise DataError("data.paths is empty: nothing to train on.")
    weights = [w for w, _ in prefixes]
    paths = [p for _, p in prefixes]
    train_samples = train_batches(cfg) * cfg.train.global_batch_size
    cache_dir.mkdir(parents=True, exist_ok=True)
    gpt_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        blend=(paths, weights if len(paths) > 1 else None),
        split=cfg.data.split,
        path_to_cache=str(cache_dir),
        tokenizer=_megatron_tokenizer(cfg.model.vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )

    def is_built_on_rank() -> bool:
        return True

    # 0, not None, for splits the run does not read: megatron-core refuses None sizes for a
    # weighted blend ("size_is_none => weights_are_none").
    sizes = [train_samples, valid_samples, 0]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, gpt_config)
    train, valid, _ = builder.build()
    if train is None or len(train) < train_samples:
        have = 0 if train is None else len(train)
        raise DataError(f"The train split of data.paths {paths} yields {have} samples of "
                        f"{cfg.train.seq_length} tokens, but {train_batches(cfg)} batches "
                        f"({cfg.train.iterations} iterations, plus skipped ones and those "
                        f"trace.on_spike may skip) x global batch {cfg.train.global_batch_size} "
                        f"need {train_samples}. Add data or give the train split more weight "
                        f"(data.split={cfg.data.split!r}).")
    return train, valid


def microbatches(dataset, cfg: Config, layout: Layout, dp_rank: int, batch: int,
                 device: torch.device) -> Iterator[dict]:
    """Yield this data-parallel rank's microbatches of global batch ``batch``, on ``device``."""
    t = cfg.train
    for m in range(layout.num_microbatches):
        rows = [dataset[global_sample_index(batch, m, dp_rank, j, t.micro_batch_size,
                                            layout.dp, t.global_batch_size)]
                for j in range(t.micro_batch_size)]
        yield {key: torch.stack([r[key] for r in rows]).to(device)
               for key in ("tokens", "labels", "loss_mask", "position_ids")}


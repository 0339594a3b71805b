"""Training datasets: megatron-core GPT datasets (blended when weighted) over indexed files, and
the one formula that decides which global sample each row of each microbatch reads.

The order is fixed and layout-aware: global sample ``g`` of row ``j`` of microbatch ``m`` on
data-parallel rank ``r`` of global batch ``b`` is

    g = start(b) + m * MBS * DP + r * MBS + j

where ``start(b)`` is the sum of the sizes of batches ``0 .. b-1`` (``b * GBS`` without a batch-size
ramp-up; with ``train.rampup_batch_size`` megatron-core's microbatch calculator sizes each batch
from the samples before it: :class:`BatchSchedule`). ``b`` is the *batch* index: iteration ``i``
(1-based) normally reads batch ``i - 1``, and batches named by ``data.skip_iterations`` are stepped
over (:func:`batch_index`). So a resume at any iteration continues exactly, and a trace can name the
sample of any row.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from concurrent.futures import Future
from functools import lru_cache
from typing import Iterable, Iterator, Optional

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


class BatchSchedule:
    """Sizes and first samples of a run's global batches, and the global sample of every row.

    Without a ramp every batch holds ``global_batch_size`` samples. With ``rampup_batch_size``
    ``[start, increment, samples]`` the size of batch ``b`` is what megatron-core's
    ``RampupBatchsizeNumMicroBatchesCalculator`` gives for the samples of batches ``0 .. b-1``
    (the training loop asks megatron-core's global calculator the same question each step). A
    batch's size depends only on its position in the data, not on which batches were skipped: a
    skip steps over a batch without moving the others.
    """

    def __init__(self, global_batch_size: int, micro_batch_size: int, dp: int,
                 rampup: Optional[tuple] = None):
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp = dp
        self.rampup = rampup
        self._starts = _ramp_starts(global_batch_size, micro_batch_size, dp, rampup)

    @classmethod
    def for_training(cls, cfg: Config, dp: int) -> "BatchSchedule":
        """The train batches of ``cfg`` at data-parallel size ``dp``."""
        t = cfg.train
        return cls(t.global_batch_size, t.micro_batch_size, dp,
                   tuple(t.rampup_batch_size) if t.rampup_batch_size else None)

    @classmethod
    def for_validation(cls, cfg: Config, dp: int) -> "BatchSchedule":
        """Validation batches: always full, so every pass measures the same amount of data."""
        return cls(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp)

    @property
    def ramp_batches(self) -> int:
        """Batches that start within the ramp's samples (0 without a ramp); every later batch is
        full."""
        return len(self._starts) - 1

    def describe_ramp(self) -> Optional[str]:
        """One line naming the ramp-up and its length in steps; None without a ramp."""
        if self.rampup is None:
            return None
        start, increment, samples = self.rampup
        return (f"batch-size ramp-up from {start} to {self.global_batch_size} sequences by "
                f"{increment} over {samples} samples: the first {self.ramp_batches} steps ramp "
                f"up (microbatches per rank at first: {self.num_microbatches(0)})")

    def start(self, batch: int) -> int:
        """The first global sample of ``batch``; also the samples of batches ``0 .. batch-1``."""
        ramp = self.ramp_batches
        if batch <= ramp:
            return self._starts[batch]
        return self._starts[ramp] + (batch - ramp) * self.global_batch_size

    def size(self, batch: int) -> int:
        """Samples in ``batch``."""
        return self.start(batch + 1) - self.start(batch)

    def num_microbatches(self, batch: int) -> int:
        """Microbatches of ``batch`` on each data-parallel rank."""
        return self.size(batch) // (self.micro_batch_size * self.dp)

    def sample_index(self, batch: int, microbatch: int, dp_rank: int, row: int) -> int:
        """The global sample read by one row of one microbatch of ``batch``."""
        return (self.start(batch) + microbatch * self.micro_batch_size * self.dp
                + dp_rank * self.micro_batch_size + row)


@lru_cache(maxsize=8)
def _ramp_starts(global_batch_size: int, micro_batch_size: int, dp: int,
                 rampup: Optional[tuple]) -> tuple[int, ...]:
    """First samples of the batches of the ramp, then of the first batch after it (``(0,)``
    without a ramp); every later batch is full. Cached: the trainer, the tracer and the data
    reader of one run share it."""
    if rampup is None:
        return (0,)
    from megatron.core.num_microbatches_calculator import (
        RampupBatchsizeNumMicroBatchesCalculator)

    start, increment, samples = rampup
    # rank=1: megatron logs the ramp from rank 0; the trainer's global calculator does that.
    calculator = RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, dp, False, 1, start, increment, samples)
    starts = [0]
    # The calculator gives the full batch once more than `samples` samples were consumed.
    while starts[-1] <= samples:
        calculator.update(starts[-1], consistency_check=True)
        starts.append(starts[-1] + calculator.get_current_global_batch_size())
    return tuple(starts)


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
            warnings.warn(f"{prefix} has no provenance sidecar (not written by `flagscale "
                          f"preprocess`, e.g. by Megatron-LM): it trains as is; traces name its "
                          f"documents, spans and text, but not file and line.")


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
    train_samples = BatchSchedule.for_training(cfg, layout.dp).start(train_batches(cfg))
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
                        f"trace.on_spike may skip) of global batch {cfg.train.global_batch_size}"
                        f"{_ramp_note(cfg)} need {train_samples}. Add data or give the train "
                        f"split more weight (data.split={cfg.data.split!r}).")
    return train, valid


def _ramp_note(cfg: Config) -> str:
    ramp = cfg.train.rampup_batch_size
    return f" (ramped up from {ramp[0]} over {ramp[2]} samples)" if ramp else ""


FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
"""The tensors of a microbatch, each ``[micro_batch_size, seq_length]``."""


def host_microbatches(dataset, schedule: BatchSchedule, dp_rank: int, batch: int,
                      pin: bool = False) -> list[dict]:
    """This data-parallel rank's microbatches of global batch ``batch`` in host memory, in page-
    locked (pinned) memory with ``pin`` so copies to a GPU can run asynchronously."""
    result = []
    for m in range(schedule.num_microbatches(batch)):
        tensors = _read_microbatch(dataset, schedule, dp_rank, batch, m)
        result.append({k: v.pin_memory() for k, v in tensors.items()} if pin else tensors)
    return result


def _read_microbatch(dataset, schedule: BatchSchedule, dp_rank: int, batch: int, m: int) -> dict:
    rows = [dataset[schedule.sample_index(batch, m, dp_rank, j)]
            for j in range(schedule.micro_batch_size)]
    return {key: torch.stack([r[key] for r in rows]) for key in FIELDS}


def to_device(microbatch: dict, device: torch.device, cp: int = 1) -> dict:
    """A host microbatch on ``device`` (asynchronous from pinned memory), then, under context
    parallelism, this rank's share of each sequence: megatron-core's
    ``get_batch_on_this_cp_rank`` keeps chunks ``r`` and ``2*cp-1-r`` of ``2*cp``, which balances
    the causal mask's work across the context-parallel ranks."""
    on_device = {k: v.to(device, non_blocking=v.is_pinned()) for k, v in microbatch.items()}
    if cp == 1:
        return on_device
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(on_device)


def microbatches(dataset, cfg: Config, layout: Layout, dp_rank: int, batch: int,
                 device: torch.device, schedule: Optional[BatchSchedule] = None) -> Iterator[dict]:
    """Yield this data-parallel rank's microbatches of global batch ``batch`` of ``schedule``
    (default: ``cfg``'s train batches), on ``device``, read one at a time on the calling
    thread."""
    schedule = schedule or BatchSchedule.for_training(cfg, layout.dp)
    for m in range(schedule.num_microbatches(batch)):
        yield to_device(_read_microbatch(dataset, schedule, dp_rank, batch, m), device, layout.cp)


class BatchPrefetcher:
    """Reads the next global batch into pinned host memory on a background thread while the
    current step computes, so a GPU step neither waits on the dataset's reads nor on pageable,
    blocking copies.

        prefetcher.device_microbatches(batch, device)   # this step's, copied asynchronously
        prefetcher.prefetch(next_batch)                 # starts reading the next one
    """

    def __init__(self, dataset, cfg: Config, layout: Layout, dp_rank: int):
        from concurrent.futures import ThreadPoolExecutor

        schedule = BatchSchedule.for_training(cfg, layout.dp)
        self._read = lambda batch: host_microbatches(dataset, schedule, dp_rank, batch, pin=True)
        self._cp = layout.cp
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flagscale-data")
        self._pending: Optional[tuple[int, Future]] = None

    def prefetch(self, batch: int) -> None:
        """Start reading global batch ``batch`` (replacing any other pending read)."""
        self._pending = (batch, self._executor.submit(self._read, batch))

    def device_microbatches(self, batch: int, device: torch.device) -> list[dict]:
        """Global batch ``batch``'s microbatches on ``device``: the prefetched ones when they are
        for this batch, otherwise read now."""
        pending, self._pending = self._pending, None
        host = pending[1].result() if pending and pending[0] == batch else self._read(batch)
        return [to_device(mb, device, self._cp) for mb in host]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

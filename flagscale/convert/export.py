"""megatron-core torch_dist checkpoint -> Hugging Face directory of the model's family
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``).

    from flagscale.convert import mcore_to_hf
    result = mcore_to_hf("runs/tiny/checkpoints", "hf/tiny", dtype="bf16")

Reads in one process whatever TP/PP/VPP layout wrote the checkpoint, one transformer layer at a
time (tensor bytes read straight from the ``.distcp`` files, ``flagscale.checkpoint.reader``;
a tensor already stored in the export's dtype as whole rows is copied file to file by the kernel,
as a plain copy is),
and streams tensors into sharded safetensors (each written at its planned offset by a few writer
threads) while the next layer is read (peak memory: a few layers); names, order and shapes come
from the family's weight mapping (``flagscale.convert.mapping``). A model with tied embeddings is
written without ``lm_head.weight``, as transformers saves it. The output is written to a
temporary sibling directory, compared layer by layer with flagscale's own megatron-core model
(``flagscale.convert.validate``, unless ``validate=False``) and only then renamed into place.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from flagscale.checkpoint import read_run_state, resolve_checkpoint
from flagscale.checkpoint.output import atomic_output_dir
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.config import Config, load_config
from flagscale.convert import mapping as M
from flagscale.convert.common import DTYPE_NAMES, DTYPES, FileBytes, prefetched
from flagscale.convert.hf_config import generation_config_dict, hf_config_dict
from flagscale.convert.safetensors_stream import plan_shards, write_sharded
from flagscale.convert.tokenizer import export_tokenizer
from flagscale.errors import CheckpointError, ConversionError, DataError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


@dataclass
class ExportResult:
    """What an export wrote and how it checked out."""

    output: Path
    checkpoint: Path
    params: int
    bytes_written: int
    seconds: float
    max_abs_diff: Optional[float]
    """Largest |logit| difference against flagscale's model; None when validation was skipped."""
    tolerance: Optional[float]
    validation: Optional[object] = None
    """The layer-by-layer :class:`~flagscale.convert.validate.ValidationReport` (None: skipped)."""

    def summary(self) -> str:
        check = ("validation skipped" if self.max_abs_diff is None else
                 f"max |logit diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        return (f"exported {self.checkpoint} -> {self.output}: {self.params / 1e6:.2f}M params, "
                f"{self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f}s; {check}")


def checkpoint_config(path: Path) -> Config:
    """The resolved flagscale config saved in checkpoint ``path``."""
    common = read_run_state(path)
    raw = (common.get("flagscale") or {}).get("config")
    if raw is None and (path / "flagscale_config.yaml").is_file():
        raw = yaml.safe_load((path / "flagscale_config.yaml").read_text())
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds no flagscale config (neither in its common state nor "
                              f"as flagscale_config.yaml), so its architecture is unknown. Was it "
                              f"written by flagscale train or flagscale convert hf-to-mcore?")
    return load_config(base=raw)


def _file_bytes(reader: CheckpointReader, key: str, entry: M.Entry, wm: M.WeightMap,
                layer: Optional[int], dtype: torch.dtype) -> Optional[list[FileBytes]]:
    """``entry``'s HF tensors as byte ranges of the checkpoint's files, where they are stored in
    the export's dtype as whole rows (no tensor-parallel column split); else None."""
    stacked = (wm.dims.num_layers,) if layer is not None else ()
    if reader.dtype(key) != dtype or reader.shape(key) != stacked + entry.mcore_shape(wm.dims):
        return None  # a wrong shape is reported, naming the tensor, on the read path
    parts = []
    for rows, shape in zip(entry.hf_rows(wm.dims), entry.hf_shapes(wm.dims)):
        ranges = reader.row_ranges(key, rows, layer)
        if ranges is None:
            return None
        parts.append(FileBytes(tuple(shape), tuple(ranges)))
    return parts


def _hf_groups(reader: CheckpointReader, prefix: str, wm: M.WeightMap, dtype: torch.dtype
               ) -> Iterator[tuple[Optional[int], list[tuple[str, torch.Tensor | FileBytes]]]]:
    """``(layer or None, HF tensors)`` in file order, in groups read together: the head, each
    layer, the tail. A tensor stored in the export's dtype as whole rows comes as
    :class:`FileBytes` (copied file to file, never read); the others are read and converted."""
    where = str(reader.path)
    for layer, entries in wm.groups():
        copied = {e.mcore: _file_bytes(reader, prefix + e.mcore, e, wm, layer, dtype)
                  for e in entries}
        read = tuple(e for e in entries if copied[e.mcore] is None)
        keys = [prefix + e.mcore for e in read]
        raw = ({k: reader.read_full(k) for k in keys} if layer is None
               else reader.read_layer(keys, layer)) if keys else {}
        converted = dict(wm.to_hf({e.mcore: raw.pop(prefix + e.mcore) for e in read}, read,
                                  layer, where))
        yield layer, [(name, converted[name].to(dtype) if copied[e.mcore] is None
                       else copied[e.mcore][i])
                      for e in entries for i, name in enumerate(e.hf_names(layer))]


def _tensors(groups, bar, layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``groups``, one at a time, naming the layer being written on ``bar``."""
    for layer, tensors in groups:
        if layer is not None:
            bar.set_postfix_str(f"layer {layer + 1}/{layers}")
        while tensors:
            yield tensors.pop(0)


def open_checkpoint(path: str | Path) -> tuple[Path, Config, CheckpointReader, str]:
    """Resolve ``path`` (iter_ dir, checkpoints dir or run dir) and check it holds the model its
    config describes. Returns (iter dir, config, reader, key prefix)."""
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    reader = CheckpointReader(ckpt)
    prefix = M.find_prefix(reader.tensors.keys())
    if prefix is None:
        raise ConversionError(f"{ckpt} holds no megatron-core GPT model tensors ("
                              f"'{M.EMBEDDING}' and '{M.QKV}' not found).")
    layers = reader.shape(prefix + M.QKV)[0]
    if layers != cfg.model.num_layers:
        raise ConversionError(f"{ckpt}: tensor '{prefix + M.QKV}' stacks {layers} layers but the "
                              f"saved config says model.num_layers={cfg.model.num_layers}.")
    return ckpt, cfg, reader, prefix


def mcore_to_hf(input: str | Path, output: str | Path, dtype: str = "bf16",
                validate: bool = True, overwrite: bool = False, tokenizer: Optional[str] = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log=print,
                progress: Optional[bool] = None) -> ExportResult:
    """Export checkpoint ``input`` to a Hugging Face directory ``output``.

    ``tokenizer`` overrides the checkpoint config's ``data.tokenizer`` (a sentencepiece model is
    converted, a HF tokenizer copied). ``progress``: show progress bars (default: when stderr is
    a terminal). Raises ConversionError on bad input or failed validation; ``output`` is then
    left as it was.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    start = time.perf_counter()
    ckpt, cfg, reader, prefix = open_checkpoint(input)
    wm = M.WeightMap.of(cfg.model, padded_vocab_size=reader.shape(prefix + M.EMBEDDING)[0])
    tok_spec = tokenizer or cfg.data.tokenizer
    if not tok_spec:
        raise ConversionError(f"{ckpt}: the saved config has no data.tokenizer; pass --tokenizer "
                              f"(a sentencepiece .model or a Hugging Face tokenizer).")
    torch_dtype = DTYPES[dtype]
    shards = plan_shards(wm.hf_file_order(), torch_dtype, max_shard_bytes)
    output = Path(output)
    with atomic_output_dir(output, overwrite, command="convert mcore-to-hf",
                           inputs=[input, ckpt]) as tmp:
        try:
            ids = export_tokenizer(tok_spec, tmp)
        except DataError as exc:
            raise ConversionError(f"Tokenizer of {ckpt}: {exc} (pass --tokenizer to point at it)."
                                  ) from None
        log(f"exporting {ckpt} ({cfg.model.family}, {cfg.model.num_layers} layers) to {output} "
            f"as {dtype}")
        total = sum(math.prod(shape) for _, shape in wm.hf_file_order()) * torch_dtype.itemsize
        layer_bytes = sum(math.prod(e.mcore_shape(wm.dims)) for e in wm.layer) * \
            torch_dtype.itemsize
        with tqdm(total=total, desc="export", unit="B", unit_scale=True,
                  disable=None if progress is None else not progress) as bar:
            tensors = _tensors(prefetched(_hf_groups(reader, prefix, wm, torch_dtype)), bar,
                               cfg.model.num_layers)
            written = write_sharded(tmp, shards, torch_dtype, tensors,
                                    max_queued_bytes=layer_bytes, on_written=bar.update)
        config = hf_config_dict(cfg.model, DTYPE_NAMES[dtype], ids["bos"], ids["eos"], ids["pad"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config_dict(ids["bos"], ids["eos"], ids["pad"]), indent=2) + "\n")
        report = None
        if validate:
            from flagscale.convert.validate import compare_layerwise

            report = compare_layerwise(ckpt, cfg, tmp, round_to=dtype, log=log,
                                       progress=progress)
    reader.close()
    params = sum(math.prod(s) for _, s in wm.hf_file_order())
    diff, tol = (None, None) if report is None else (report.max_abs_diff, report.tolerance)
    return ExportResult(output, ckpt, params, written, time.perf_counter() - start, diff, tol,
                        report)


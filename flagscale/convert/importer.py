"""Hugging Face directory of a supported family (``LlamaForCausalLM``, ``AquilaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``) -> megatron-core torch_dist checkpoint.

    from flagscale.convert import hf_to_mcore
    hf_to_mcore("hf/llama3_8b", "ckpt/llama3_8b", tp=8, pp=4)   # validated by default
    # then: flagscale train CONFIG checkpoint.load=ckpt/llama3_8b

The checkpoint holds the model weights only (no optimizer state, no schedule, iteration 0): a
training run loading it starts continued pretraining with a fresh optimizer. torch_dist stores
global tensors with their shard metadata, so one process writes it and any TP/PP/VPP loads it;
``tp`` only sets the vocabulary padding (a multiple of 128 * tp) and, with ``pp``, the layout
recorded in the saved config.

No model is built and, when the checkpoint keeps the weights' dtype (bf16 or fp32 weights), no
weight is read: the safetensors are taken one group at a time (the embedding, each layer, the
final norm and output layer), each megatron-core tensor is described as the places of the Hugging
Face rows the family's weight mapping assembles it from, and the checkpoint's files are written
as megatron-core would have saved them (one chunk per layer of each stacked tensor, plus the
layer modules' ``_extra_state`` objects, taken from one megatron-core layer built for that
purpose) with those rows copied file to file by the kernel, as a plain copy does. Weights that
change dtype (fp16 -> fp32) are read into place, cast and written while the next group is read.
Peak memory is a layer at most, whatever the depth.
Every tensor in the safetensors must be consumed by the mapping: one that would be dropped (a
Qwen2's q/k/v biases under a Llama config) is an error naming it. The written checkpoint is then
compared with the source layer by layer (``flagscale.convert.validate``) unless
``validate=False``, and only then moved into place.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
import yaml

from flagscale.checkpoint.output import atomic_output_dir
from flagscale.checkpoint.reader import READ_THREADS, empty
from flagscale.config import (Config, ModelConfig, ParallelDims, config_to_dict,
                              padded_vocab_size)
from flagscale.config import validate as check_config
from flagscale.convert import mapping as M
from flagscale.convert.common import (ZEROS, FileBytes, layer_sharded_state, megatron_layer,
                                      prefetched, single_process_megatron)
from flagscale.convert.hf_config import load_config_json, model_fields_from_hf
from flagscale.convert.safetensors_stream import SafetensorsReader
from flagscale.convert.torch_dist_writer import TorchDistWriter
from flagscale.errors import ConversionError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "tokenizer.model")
# Buffers older transformers saved beside the weights: derived from rope_theta, not learned.
_INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _target_config(hf_dir: Path, output: Path, tp: int, pp: int) -> Config:
    fields = model_fields_from_hf(load_config_json(hf_dir), str(hf_dir / "config.json"))
    cfg = Config(model=ModelConfig(**fields))
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    if any((hf_dir / n).is_file() for n in _TOKENIZER_FILES):
        cfg.data.tokenizer = str((output / "tokenizer").resolve())
    return cfg


def check_all_consumed(weights: SafetensorsReader, wm: M.WeightMap, cfg: Config) -> None:
    """Refuse safetensors tensors the mapping would not convert, naming them. Two kinds are
    accepted after a check instead of dropped: a tied model's ``lm_head.weight`` equal to the
    embedding, and rotary ``inv_freq`` buffers equal to what rope_theta gives."""
    expected = {name for name, _ in wm.hf_file_order()}
    extra = [name for name in weights.keys() if name not in expected]
    refused = []
    for name in extra:
        if name == "lm_head.weight" and cfg.model.tie_word_embeddings:
            embed = wm.entry(M.EMBEDDING).hf_names()[0]
            if weights.shape(name) == weights.shape(embed) and torch.equal(
                    weights.get(name), weights.get(embed)):
                continue
        elif _INV_FREQ.match(name) and cfg.model.rope_scaling_factor is None:
            d = wm.dims.head_dim
            theta = cfg.model.rope_theta
            formula = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            got = weights.get(name).double()
            if got.shape == formula.shape and torch.allclose(got, formula, rtol=1e-3):
                continue
        refused.append(name)
    if refused:
        shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6
                                          else "")
        hint = (" q/k/v biases belong to Qwen2ForCausalLM: is config.json's 'architectures' "
                "right?" if any(n.endswith("_proj.bias") for n in refused) else "")
        raise ConversionError(
            f"{weights.where} holds {len(refused)} tensor(s) that a {cfg.model.family} model "
            f"with this config.json does not have, so converting would drop them: {shown}."
            f"{hint} Fix config.json to describe the model these weights belong to (flagscale "
            f"never drops weights).")


def _layer_objects(layer, num_layers: int) -> list[dict]:
    """Per layer: the layer modules' ShardedObjects (``_extra_state``) by unique key."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return [{item.unique_key: item.data
             for item in layer_sharded_state(layer, index, num_layers).values()
             if isinstance(item, ShardedObject)} for index in range(num_layers)]


class _Buffers:
    """Buffers of the read-then-cast path reused from layer to layer: a fresh allocation per
    layer costs page faults and zeroing, and on a node whose memory the page cache fills (any
    long conversion), reclaiming pages first."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else empty(shape, dtype)

    def give(self, tensor: torch.Tensor) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


def _group(weights: SafetensorsReader, wm: M.WeightMap, entries, layer: Optional[int],
           dtype: torch.dtype, pool: ThreadPoolExecutor, buffers: _Buffers
           ) -> dict[str, torch.Tensor | FileBytes]:
    """The megatron-core tensors of ``entries`` in ``dtype``. One whose Hugging Face tensors are
    stored in ``dtype`` comes as :class:`FileBytes`, the places of its HF rows in the
    safetensors (copied file to file by the writer, never read); the others (a cast, e.g. fp16
    weights into an fp32 checkpoint) are assembled by reading each HF tensor's rows straight
    into place, several reads at once, and cast."""
    out, reads = {}, []
    for e in entries:
        names = e.hf_names(layer)
        for name, shape in zip(names, e.hf_shapes(wm.dims)):
            M.check_shape(name, weights.shape(name), shape, weights.where)
        dtypes = {weights.dtype(name) for name in names}
        if len(dtypes) != 1:
            raise ConversionError(f"{weights.where}: {', '.join(names)} have different dtypes "
                                  f"({', '.join(sorted(map(str, dtypes)))}).")
        source, shape = dtypes.pop(), e.mcore_shape(wm.dims)
        if source == dtype:
            row = math.prod(shape[1:]) * dtype.itemsize
            out[e.mcore] = FileBytes(shape, tuple(
                (ZEROS, 0, (stop - start) * row) if i is None else
                weights.row_bytes(names[i], at, at + stop - start)
                for start, stop, i, at in e.pieces(wm.dims)), dtype)
        else:
            out[e.mcore] = e.fill(buffers.take(shape, source), wm.dims,
                                  lambda i, start, stop, dst, names=names:
                                  reads.append((names[i], start, stop, dst)))
    for done in pool.map(lambda job: weights.rows(*job), reads):
        del done
    for key, tensor in out.items():
        if isinstance(tensor, torch.Tensor):
            out[key] = tensor.to(dtype)
            buffers.give(tensor)
    return out


def _groups(weights: SafetensorsReader, wm: M.WeightMap, dtype: torch.dtype):
    """``(layer or None, {mcore key: tensor or FileBytes}, HF bytes)`` in file order."""
    buffers = _Buffers()
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="flagscale-hf-read") as pool:
        for layer, entries in wm.groups():
            nbytes = sum(weights.nbytes(name) for e in entries for name in e.hf_names(layer))
            yield layer, _group(weights, wm, entries, layer, dtype, pool, buffers), nbytes


def _with_layer_axis(tensor: torch.Tensor | FileBytes) -> torch.Tensor | FileBytes:
    """``tensor`` as the chunk of one layer of a tensor stacked over layers."""
    if isinstance(tensor, FileBytes):
        return dataclasses.replace(tensor, shape=(1, *tensor.shape))
    return tensor.unsqueeze(0)


def hf_to_mcore(input: str | Path, output: str | Path, tp: int = 1, pp: int = 1,
                overwrite: bool = False, validate: bool = True, log=print,
                progress: Optional[bool] = None) -> Path:
    """Write a model-only megatron-core checkpoint of HF directory ``input`` to ``output`` (an
    ``iter_``-style directory ``checkpoint.load`` accepts), checked layer by layer against the
    source unless ``validate=False``. Returns ``output``. ``progress``: show progress bars
    (default: when stderr is a terminal)."""
    from tqdm import tqdm

    from flagscale.checkpoint.meta import CheckpointMeta

    start = time.perf_counter()
    hf_dir, output = Path(input), Path(output)
    if not hf_dir.is_dir():
        raise ConversionError(f"--input {hf_dir} is not a directory; give a Hugging Face model "
                              f"directory (config.json + safetensors).")
    weights = SafetensorsReader(hf_dir)
    cfg = _target_config(hf_dir, output, tp, pp)
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    check_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                   global_batch_size=1)),
                 world_size=ParallelDims(tp=tp, pp=pp, dp=1).world_size, check_paths=False)
    wm = M.WeightMap.of(cfg.model, padded_vocab_size=padded)
    check_all_consumed(weights, wm, cfg)
    # The model is built in bf16 when the weights are bf16, fp32 otherwise (fp16 widens exactly).
    embed_dtype = weights.dtype(wm.entry(M.EMBEDDING).hf_names()[0])
    params_dtype = "bf16" if embed_dtype == torch.bfloat16 else "fp32"
    cfg.model.params_dtype = params_dtype
    dtype = torch.bfloat16 if params_dtype == "bf16" else torch.float32
    layers = cfg.model.num_layers
    layer_bytes = sum(torch.Size(e.mcore_shape(wm.dims)).numel() for e in wm.layer) * \
        dtype.itemsize
    report = None
    with atomic_output_dir(output, overwrite, command="convert hf-to-mcore",
                           inputs=[hf_dir]) as tmp, single_process_megatron() as platform:
        objects = _layer_objects(megatron_layer(cfg, padded, params_dtype, platform), layers)
        bar = tqdm(total=weights.nbytes(), desc="import", unit="B", unit_scale=True,
                   disable=None if progress is None else not progress)
        with TorchDistWriter(tmp, max_queued_bytes=layer_bytes) as writer:
            for layer, tensors, nbytes in prefetched(_groups(weights, wm, dtype)):
                for key, tensor in tensors.items():
                    if layer is None:
                        writer.add_tensor(key, tensor.shape, (0,) * len(tensor.shape), tensor)
                    else:
                        writer.add_tensor(key, (layers, *tensor.shape),
                                          (layer,) + (0,) * len(tensor.shape),
                                          _with_layer_axis(tensor))
                if layer is not None:
                    for unique_key, obj in objects[layer].items():
                        writer.add_object(unique_key, obj)
                    bar.set_postfix_str(f"layer {layer + 1}/{layers}")
                del tensors
                bar.update(nbytes)
            meta = CheckpointMeta(config_to_dict(cfg), ParallelDims(tp=tp, pp=pp, dp=1),
                                  has_optimizer=False, source=str(hf_dir.resolve()))
            writer.finish({"iteration": 0, "consumed_samples": 0, "flagscale": meta.to_dict()})
            written = writer.bytes_written
        bar.close()
        (tmp / "flagscale_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg),
                                                                  sort_keys=False))
        if cfg.data.tokenizer:
            (tmp / "tokenizer").mkdir()
            for name in _TOKENIZER_FILES:
                if (hf_dir / name).is_file():
                    shutil.copy2(hf_dir / name, tmp / "tokenizer" / name)
        if validate:
            from flagscale.convert.validate import compare_layerwise

            report = compare_layerwise(tmp, cfg, hf_dir, log=log, progress=progress)
    weights.close()
    params = sum(torch.Size(shape).numel() for _, shape in wm.hf_file_order())
    check = ("validation skipped" if report is None else
             f"max |logit diff| {report.max_abs_diff:.3g} (tolerance {report.tolerance:.3g})")
    log(f"imported {hf_dir} -> {output}: {cfg.model.family}, {params / 1e6:.2f}M params, "
        f"{layers} layers, {written / 1e9:.2f} GB in {time.perf_counter() - start:.1f}s; vocab "
        f"{cfg.model.vocab_size} padded to {padded} for tp={tp}, {params_dtype} weights; {check}. "
        f"Model weights only: no optimizer state, training from it starts a fresh optimizer at "
        f"iteration 0.")
    return output

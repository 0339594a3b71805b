"""Hugging Face directory of a supported family (``LlamaForCausalLM``, ``AquilaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``) -> megatron-core torch_dist checkpoint.

    from flagscale.convert import hf_to_mcore
    hf_to_mcore("hf/llama3_8b", "ckpt/llama3_8b", tp=8, pp=4)
    # then: flagscale train CONFIG checkpoint.load=ckpt/llama3_8b

The checkpoint holds the model weights only (no optimizer state, no schedule, iteration 0): a
training run loading it starts continued pretraining with a fresh optimizer. torch_dist stores
global tensors with their shard metadata, so one process writes it and any TP/PP/VPP loads it;
``tp`` only sets the vocabulary padding (a multiple of 128 * tp) and, with ``pp``, the layout
recorded in the saved config.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from flagscale.checkpoint.output import atomic_output_dir
from flagscale.config import (Config, ModelConfig, ParallelDims, config_to_dict,
                              padded_vocab_size, validate)
from flagscale.convert import mapping as M
from flagscale.convert.common import single_process_layout, single_process_megatron
from flagscale.convert.hf_config import load_config_json, model_fields_from_hf
from flagscale.errors import ConversionError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "tokenizer.model")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


class HFWeights:
    """Lazy access to the tensors of a HF directory's safetensors files (single or sharded)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConversionError(f"{hf_dir} has no model.safetensors or "
                                  f"model.safetensors.index.json; flagscale reads safetensors "
                                  f"weights only (re-save with save_pretrained(safe_serialization="
                                  f"True)).")
        self.where = str(hf_dir)
        self._files = {name: safe_open(str(hf_dir / name), framework="pt") for name in files}
        self._owner = {key: name for name, f in self._files.items() for key in f.keys()}

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (ConversionError when absent)."""
        if name not in self._owner:
            raise ConversionError(f"Tensor '{name}' is missing from {self.where}.")
        return self._files[self._owner[name]].get_tensor(name)

    def dtype(self, wm: M.WeightMap) -> torch.dtype:
        """dtype of the weights (that of the embedding)."""
        return self.get(wm.entry(M.EMBEDDING).hf_names()[0]).dtype


def _target_config(hf_dir: Path, output: Path, tp: int, pp: int) -> Config:
    fields = model_fields_from_hf(load_config_json(hf_dir), str(hf_dir / "config.json"))
    cfg = Config(model=ModelConfig(**fields))
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    if any((hf_dir / n).is_file() for n in _TOKENIZER_FILES):
        cfg.data.tokenizer = str((output / "tokenizer").resolve())
    return cfg


@torch.no_grad()
def _fill_model(model, weights: HFWeights, wm: M.WeightMap) -> None:
    """Copy the HF weights into a TP=PP=1 model through its sharded state dict, so every global
    megatron-core key (whatever the layer spec names the module) gets its mapped tensor. A tied
    output layer is the embedding itself here; a checkpoint stores it once and megatron-core
    loads it into the last stage's copy under the embedding's key."""
    sharded = model.sharded_state_dict()
    by_layer: dict[Optional[int], dict[str, torch.Tensor]] = {}
    for local_name, item in sharded.items():
        if not hasattr(item, "data") or not isinstance(item.data, torch.Tensor):
            continue  # _extra_state objects: saved as they are
        match = _LAYER.match(local_name)
        by_layer.setdefault(int(match.group(1)) if match else None, {})[item.key] = item.data
    for layer, entries in wm.groups():
        targets = by_layer[layer]
        hf = {name: weights.get(name) for e in entries for name in e.hf_names(layer)}
        for key, tensor in wm.from_hf(hf, entries, layer, weights.where).items():
            targets.pop(key).copy_(tensor)
    unfilled = sorted({key for targets in by_layer.values() for key in targets})
    if unfilled:
        raise ConversionError(f"The model has tensors its family's weight mapping does not fill: "
                              f"{', '.join(unfilled)}.")


def hf_to_mcore(input: str | Path, output: str | Path, tp: int = 1, pp: int = 1,
                overwrite: bool = False, log=print) -> Path:
    """Write a model-only megatron-core checkpoint of HF directory ``input`` to ``output`` (an
    ``iter_``-style directory ``checkpoint.load`` accepts). Returns ``output``."""
    from megatron.core import dist_checkpointing

    from flagscale.checkpoint.meta import CheckpointMeta
    from flagscale.models import build_model

    start = time.perf_counter()
    hf_dir, output = Path(input), Path(output)
    if not hf_dir.is_dir():
        raise ConversionError(f"--input {hf_dir} is not a directory; give a Hugging Face model "
                              f"directory (config.json + safetensors).")
    weights = HFWeights(hf_dir)
    cfg = _target_config(hf_dir, output, tp, pp)
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=1)),
             world_size=ParallelDims(tp=tp, pp=pp, dp=1).world_size, check_paths=False)
    wm = M.WeightMap.of(cfg.model, padded_vocab_size=padded)
    params_dtype = "bf16" if weights.dtype(wm) == torch.bfloat16 else "fp32"
    cfg.model.params_dtype = params_dtype
    one, layout = single_process_layout(cfg, padded, params_dtype)
    with atomic_output_dir(output, overwrite, command="convert hf-to-mcore",
                           inputs=[hf_dir]) as tmp, single_process_megatron() as platform:
        model = build_model(one, layout, platform)[0]
        _fill_model(model, weights, wm)
        state = {"model": model.sharded_state_dict(), "iteration": 0, "consumed_samples": 0,
                 "flagscale": CheckpointMeta(config_to_dict(cfg), ParallelDims(tp=tp, pp=pp, dp=1),
                                             has_optimizer=False,
                                             source=str(hf_dir.resolve())).to_dict()}
        dist_checkpointing.save(state, str(tmp))
        (tmp / "flagscale_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg),
                                                                  sort_keys=False))
        if cfg.data.tokenizer:
            (tmp / "tokenizer").mkdir()
            for name in _TOKENIZER_FILES:
                if (hf_dir / name).is_file():
                    shutil.copy2(hf_dir / name, tmp / "tokenizer" / name)
    log(f"imported {hf_dir} -> {output}: {cfg.model.family}, {cfg.model.num_layers} layers, "
        f"vocab {cfg.model.vocab_size} "
        f"padded to {padded} for tp={tp}, {params_dtype} weights, in "
        f"{time.perf_counter() - start:.1f}s. Model weights only: no optimizer state, training "
        f"from it starts a fresh optimizer at iteration 0.")
    return output

"""Execute a model family's declarative Hugging Face weight mapping on megatron-core's global
tensors.

    wm = WeightMap.of(cfg.model, padded_vocab_size=4352)
    for layer, entries in wm.groups():          # the head, each layer, the tail: file order
        hf = wm.to_hf({e.mcore: tensor, ...}, entries, layer)

The entries (``flagscale.models.hf_mapping``) come from the family's spec, in file order; the
per-layer ones sit together between the tensors written before the layers (the embedding) and
after them (final norm, output layer). Everything here is derived from that list: which
megatron-core keys are read per layer, the Hugging Face names and their order, and the shape
checks on both sides. Conversions stream one group (one layer) at a time. All functions are pure:
they take and return tensors and never touch files.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from flagscale.config import ModelConfig
from flagscale.errors import ConversionError
from flagscale.models import ModelDims, get_model_spec
from flagscale.models.hf_mapping import Entry

# Keys every megatron-core GPTModel checkpoint holds, whatever the family: they locate the model
# inside a checkpoint and count its layers.
EMBEDDING = "embedding.word_embeddings.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"


def check_shape(name: str, shape, expected: tuple[int, ...], where: str) -> None:
    """Raise ConversionError naming ``name`` when ``shape`` is not ``expected``."""
    if tuple(shape) != tuple(expected):
        raise ConversionError(f"Tensor '{name}' in {where} has shape {tuple(shape)}, "
                              f"expected {tuple(expected)} for this architecture. The weights do "
                              f"not match the config (wrong config.json, or a different model).")


class WeightMap:
    """A family's mapping bound to one model's dimensions."""

    def __init__(self, entries, dims: ModelDims):
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.dims = dims
        flags = [e.per_layer for e in self.entries]
        first = flags.index(True) if True in flags else len(flags)
        last = len(flags) - flags[::-1].index(True) if True in flags else first
        if not all(flags[first:last]):
            raise ConversionError("A family's weight mapping must list its per-layer entries "
                                  "together (between the tensors before and after the layers).")
        self.head = self.entries[:first]
        """Entries written before the layers."""
        self.layer = self.entries[first:last]
        """Entries of one transformer layer."""
        self.tail = self.entries[last:]
        """Entries written after the layers."""

    @classmethod
    def of(cls, model: ModelConfig, padded_vocab_size: Optional[int] = None) -> "WeightMap":
        """The mapping of ``model``'s family; ``padded_vocab_size``: megatron-core's vocabulary
        rows (defaults to the true vocabulary)."""
        dims = ModelDims.of(model, padded_vocab_size)
        if dims.vocab_rows < dims.vocab_size:
            raise ConversionError(f"Cannot pad a vocabulary of {dims.vocab_size} rows down to "
                                  f"{dims.vocab_rows}.")
        return cls(get_model_spec(model).hf_mapping(model), dims)

    def groups(self) -> Iterator[tuple[Optional[int], tuple[Entry, ...]]]:
        """``(layer or None, entries)`` in file order: head, every layer, tail."""
        if self.head:
            yield None, self.head
        for index in range(self.dims.num_layers):
            yield index, self.layer
        if self.tail:
            yield None, self.tail

    def hf_file_order(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every Hugging Face tensor with its shape, in file order."""
        return [item for layer, entries in self.groups() for e in entries
                for item in zip(e.hf_names(layer), e.hf_shapes(self.dims))]

    def entry(self, mcore: str) -> Entry:
        """The entry of megatron-core key ``mcore``."""
        for e in self.entries:
            if e.mcore == mcore:
                return e
        raise ConversionError(f"The weight mapping has no entry for megatron-core tensor "
                              f"'{mcore}'.")

    def to_hf(self, tensors: dict[str, torch.Tensor], entries: tuple[Entry, ...],
              layer: Optional[int] = None, where: str = "the checkpoint"
              ) -> list[tuple[str, torch.Tensor]]:
        """megatron-core tensors of ``entries`` (keyed by ``entry.mcore``, no layer axis) -> HF
        ``(name, tensor)`` pairs in file order."""
        out = []
        for e in entries:
            label = e.mcore if layer is None else f"{e.mcore} [layer {layer}]"
            if e.mcore not in tensors:
                raise ConversionError(f"Tensor '{label}' is missing from {where}.")
            check_shape(label, tensors[e.mcore].shape, e.mcore_shape(self.dims), where)
            out += zip(e.hf_names(layer), e.to_hf(tensors[e.mcore], self.dims))
        return out

    def from_hf(self, tensors: dict[str, torch.Tensor], entries: tuple[Entry, ...],
                layer: Optional[int] = None, where: str = "the Hugging Face weights"
                ) -> dict[str, torch.Tensor]:
        """HF tensors (by name) -> megatron-core tensors of ``entries`` (no layer axis)."""
        out = {}
        for e in entries:
            parts = []
            for name, shape in zip(e.hf_names(layer), e.hf_shapes(self.dims)):
                if name not in tensors:
                    raise ConversionError(f"Tensor '{name}' is missing from {where}.")
                check_shape(name, tensors[name].shape, shape, where)
                parts.append(tensors[name])
            out[e.mcore] = e.from_hf(tuple(parts), self.dims)
        return out

    def layer_to_hf(self, tensors: dict[str, torch.Tensor], layer: int,
                    where: str = "the checkpoint") -> dict[str, torch.Tensor]:
        """One layer's megatron-core tensors -> its HF tensors."""
        return dict(self.to_hf(tensors, self.layer, layer, where))

    def layer_from_hf(self, tensors: dict[str, torch.Tensor], layer: int,
                      where: str = "the Hugging Face weights") -> dict[str, torch.Tensor]:
        """One layer's HF tensors -> its megatron-core tensors."""
        return self.from_hf(tensors, self.layer, layer, where)


def find_prefix(keys, required: tuple[str, ...] = (EMBEDDING, QKV)) -> Optional[str]:
    """The key prefix under which a checkpoint stores the model (usually empty)."""
    candidates = sorted({k[:-len(required[0])] for k in keys if k.endswith(required[0])}, key=len)
    for prefix in candidates:
        if all(prefix + r in keys for r in required[1:]):
            return prefix
    return None

"""Entries of a declarative Hugging Face <-> megatron-core weight mapping.

A family lists its tensors once, e.g. ``QKV(mcore, q=..., k=..., v=...)``; each entry knows both
directions and the shapes on both sides, so conversion (``flagscale.convert.mapping``) derives shape
checks, file order and the streaming of one layer at a time from the list alone. megatron-core keys
are the global keys of its torch_dist checkpoints: per-layer tensors (``decoder.layers.*``) are
stacked on a leading layer axis and named here without it; Hugging Face names of per-layer tensors
hold ``{layer}``. Biases are more entries of the same kinds (a ``.bias`` key has no column axis).

Facts the entries rely on (REFERENCE section 4):

- Fused QKV rows are grouped per key/value group: ``[q (heads_per_group * d), k (d), v (d)]`` for
  each group in turn. TP shards split whole groups, so the global tensor does not depend on TP.
- Global fc1 is ``cat([gate_proj, up_proj])`` (megatron's swiglu sharded factory stores the gate
  halves of every TP shard first, then the up halves).
- No RoPE permutation: both sides rotate halves (mcore ``rotary_interleaved=False``).
- Embedding and output layer rows are padded above the true vocabulary.

Entries are pure: they take and return tensors and never touch files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flagscale.errors import ConversionError
from flagscale.models.spec import ModelDims

if TYPE_CHECKING:  # entries are declared at import; torch is needed only to convert
    import torch

Shape = tuple[int, ...]


def _columns(mcore: str, dims: ModelDims) -> Shape:
    """Trailing dims of a projection: the input width for weights, none for biases."""
    return () if mcore.endswith(".bias") else (dims.hidden_size,)


@dataclass(frozen=True)
class Entry:
    """One megatron-core tensor and the Hugging Face tensor(s) it is made of."""

    mcore: str

    @property
    def per_layer(self) -> bool:
        """Stacked over layers in megatron-core (one copy per transformer layer)."""
        return self.mcore.startswith("decoder.layers.")

    @property
    def hf(self) -> tuple[str, ...]:
        """Hugging Face name templates (``{layer}`` filled per layer)."""
        raise NotImplementedError

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(name.format(layer=layer) for name in self.hf)

    def hf_shapes(self, dims: ModelDims) -> tuple[Shape, ...]:
        raise NotImplementedError

    def mcore_shape(self, dims: ModelDims) -> Shape:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, dims: ModelDims) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def from_hf(self, tensors: tuple[torch.Tensor, ...], dims: ModelDims) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(Entry):
    """The same tensor on both sides; ``shape`` names :class:`ModelDims` attributes."""

    name: str
    shape: tuple[str, ...]

    @property
    def hf(self) -> tuple[str, ...]:
        return (self.name,)

    def hf_shapes(self, dims: ModelDims) -> tuple[Shape, ...]:
        return (self.mcore_shape(dims),)

    def mcore_shape(self, dims: ModelDims) -> Shape:
        return tuple(getattr(dims, attr) for attr in self.shape)

    def to_hf(self, tensor, dims):
        return (tensor,)

    def from_hf(self, tensors, dims):
        return tensors[0]


@dataclass(frozen=True)
class Vocab(Entry):
    """Embedding or output layer: megatron-core pads rows above the vocabulary with zeros."""

    name: str

    @property
    def hf(self) -> tuple[str, ...]:
        return (self.name,)

    def hf_shapes(self, dims: ModelDims) -> tuple[Shape, ...]:
        return ((dims.vocab_size, dims.hidden_size),)

    def mcore_shape(self, dims: ModelDims) -> Shape:
        return (dims.vocab_rows, dims.hidden_size)

    def to_hf(self, tensor, dims):
        return (tensor[:dims.vocab_size],)

    def from_hf(self, tensors, dims):
        weight = tensors[0]
        extra = dims.vocab_rows - weight.shape[0]
        if extra < 0:
            raise ConversionError(f"Cannot pad a vocabulary of {weight.shape[0]} rows down to "
                                  f"{dims.vocab_rows}.")
        if extra == 0:
            return weight
        import torch

        return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])])


@dataclass(frozen=True)
class QKV(Entry):
    """megatron-core's fused query/key/value projection (weight or bias) <-> HF q, k, v."""

    q: str
    k: str
    v: str

    @property
    def hf(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def hf_shapes(self, dims: ModelDims) -> tuple[Shape, ...]:
        cols = _columns(self.mcore, dims)
        return ((dims.q_width, *cols), (dims.kv_width, *cols), (dims.kv_width, *cols))

    def mcore_shape(self, dims: ModelDims) -> Shape:
        return (dims.q_width + 2 * dims.kv_width, *_columns(self.mcore, dims))

    def to_hf(self, tensor, dims):
        d, g, hpg = dims.head_dim, dims.num_query_groups, dims.heads_per_group
        cols = tensor.shape[1:]
        q, k, v = tensor.reshape(g, (hpg + 2) * d, *cols).split([hpg * d, d, d], dim=1)
        return tuple(t.reshape(-1, *cols).contiguous() for t in (q, k, v))

    def from_hf(self, tensors, dims):
        import torch

        q, k, v = tensors
        d, g, hpg = dims.head_dim, dims.num_query_groups, dims.heads_per_group
        cols = q.shape[1:]
        grouped = torch.cat([q.reshape(g, hpg * d, *cols), k.reshape(g, d, *cols),
                             v.reshape(g, d, *cols)], dim=1)
        return grouped.reshape(-1, *cols)


@dataclass(frozen=True)
class GatedMLP(Entry):
    """megatron-core's fused SwiGLU input projection <-> HF gate and up projections."""

    gate: str
    up: str

    @property
    def hf(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def hf_shapes(self, dims: ModelDims) -> tuple[Shape, ...]:
        cols = _columns(self.mcore, dims)
        return ((dims.ffn_hidden_size, *cols),) * 2

    def mcore_shape(self, dims: ModelDims) -> Shape:
        return (2 * dims.ffn_hidden_size, *_columns(self.mcore, dims))

    def to_hf(self, tensor, dims):
        return tuple(t.contiguous() for t in tensor.chunk(2, dim=0))

    def from_hf(self, tensors, dims):
        import torch

        return torch.cat(tensors)

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

Entries are pure: they take and return tensors and never touch files. Every Hugging Face tensor
of the kinds here is a selection of the megatron-core tensor's rows (``hf_rows``), which is how
``to_hf`` converts and how an export copies rows straight from file to file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from flagscale.models.spec import ModelDims

if TYPE_CHECKING:  # entries are declared at import; torch is needed only to convert
    import torch

Shape = tuple[int, ...]
Rows = tuple[tuple[int, int], ...]
"""``(start, stop)`` row ranges of a megatron-core tensor (first axis, no layer axis), in order."""


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

    def hf_rows(self, dims: ModelDims) -> tuple[Rows, ...]:
        """Per Hugging Face tensor, the rows of the megatron-core tensor it is made of."""
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, dims: ModelDims) -> tuple[torch.Tensor, ...]:
        """The Hugging Face tensors of ``tensor``: its rows as :meth:`hf_rows` lists them."""
        import torch

        return tuple(tensor[rows[0][0]:rows[0][1]] if len(rows) == 1 else
                     torch.cat([tensor[start:stop] for start, stop in rows])
                     for rows in self.hf_rows(dims))

    def pieces(self, dims: ModelDims) -> list[tuple[int, int, int | None, int]]:
        """The megatron-core tensor's rows in order, as ``(start, stop, i, at)``: rows
        ``start:stop`` are rows ``at:at + stop - start`` of Hugging Face tensor ``i``, or zeros
        where ``i`` is None (the vocabulary padding no HF tensor gives)."""
        given = []
        for i, rows in enumerate(self.hf_rows(dims)):
            at = 0
            for start, stop in rows:
                given.append((start, stop, i, at))
                at += stop - start
        pieces, edge = [], 0
        for start, stop, i, at in sorted(given):
            if start > edge:
                pieces.append((edge, start, None, 0))
            pieces.append((start, stop, i, at))
            edge = max(edge, stop)
        rows = self.mcore_shape(dims)[0]
        if edge < rows:
            pieces.append((edge, rows, None, 0))
        return pieces

    def fill(self, out: torch.Tensor, dims: ModelDims,
             take: Callable[[int, int, int, torch.Tensor], object]) -> torch.Tensor:
        """Assemble the megatron-core tensor in ``out`` (its shape) from :meth:`pieces`:
        ``take(i, start, stop, dst)`` puts rows ``start:stop`` of Hugging Face tensor ``i`` into
        ``dst``; padding rows are zeroed. Returns ``out``."""
        for start, stop, i, at in self.pieces(dims):
            if i is None:
                out[start:stop].zero_()
            else:
                take(i, at, at + stop - start, out[start:stop])
        return out

    def from_hf(self, tensors: tuple[torch.Tensor, ...], dims: ModelDims) -> torch.Tensor:
        """The megatron-core tensor made of the Hugging Face ``tensors`` (see :meth:`fill`)."""
        shape = self.mcore_shape(dims)
        if self.hf_rows(dims) == (((0, shape[0]),),):
            return tensors[0]  # the same tensor on both sides
        return self.fill(tensors[0].new_empty(shape), dims,
                         lambda i, start, stop, dst: dst.copy_(tensors[i][start:stop]))


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

    def hf_rows(self, dims):
        return (((0, self.mcore_shape(dims)[0]),),)


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

    def hf_rows(self, dims):
        return (((0, dims.vocab_size),),)


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

    def hf_rows(self, dims):
        d, g, hpg = dims.head_dim, dims.num_query_groups, dims.heads_per_group
        group = (hpg + 2) * d
        return (tuple((i * group, i * group + hpg * d) for i in range(g)),
                tuple((i * group + hpg * d, i * group + (hpg + 1) * d) for i in range(g)),
                tuple((i * group + (hpg + 1) * d, (i + 1) * group) for i in range(g)))


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

    def hf_rows(self, dims):
        ffn = dims.ffn_hidden_size
        return (((0, ffn),), ((ffn, 2 * ffn),))

"""Tensor mapping between Hugging Face ``LlamaForCausalLM`` and megatron-core's global tensors.

megatron-core's torch_dist checkpoints store every weight as one global (unsharded) tensor, with
transformer layers stacked on a leading layer axis; this module maps one layer (or the embedding,
final norm and output layer) at a time so conversions stream. Facts relied on (REFERENCE section 4):

- Fused QKV rows are grouped per key/value group: ``[q (heads_per_group * d), k (d), v (d)]`` for
  each group in turn. TP shards split whole groups, so the global tensor does not depend on TP.
- Global fc1 is ``cat([gate_proj, up_proj])`` (megatron's swiglu sharded factory stores the gate
  halves of every TP shard first, then the up halves).
- No RoPE permutation: both sides rotate halves (mcore ``rotary_interleaved=False``).
- Embedding and output layer rows are padded above the true vocabulary.

All functions are pure: they take and return tensors and never touch files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from flagscale.errors import ConversionError

# megatron-core global keys of one transformer layer's tensors (TE names; the local spec maps its
# layer-norm keys onto these through ``sharded_state_dict_keys_map``).
QKV = "decoder.layers.self_attention.linear_qkv.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
LAYER_KEYS = (INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2)
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions a conversion needs (from a flagscale ``ModelConfig`` or a HF config)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    """True vocabulary size (HF side, unpadded)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_model_config(cls, model) -> "LlamaShape":
        """From a flagscale ``ModelConfig``."""
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads,
                   model.num_query_groups or model.num_attention_heads, model.ffn_hidden_size,
                   model.vocab_size)

    def mcore_layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of each of one layer's megatron-core tensors."""
        h, d = self.hidden_size, self.head_dim
        qkv_rows = (self.num_attention_heads + 2 * self.num_query_groups) * d
        return {INPUT_NORM: (h,), QKV: (qkv_rows, h), PROJ: (h, self.num_attention_heads * d),
                MLP_NORM: (h,), FC1: (2 * self.ffn_hidden_size, h), FC2: (h, self.ffn_hidden_size)}

    def hf_layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Expected shape of each of one layer's Hugging Face tensors."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        names = hf_layer_names(layer)
        return {names["input_norm"]: (h,), names["q"]: (self.num_attention_heads * d, h),
                names["k"]: (self.num_query_groups * d, h),
                names["v"]: (self.num_query_groups * d, h),
                names["o"]: (h, self.num_attention_heads * d), names["mlp_norm"]: (h,),
                names["gate"]: (f, h), names["up"]: (f, h), names["down"]: (h, f)}


def hf_layer_names(layer: int) -> dict[str, str]:
    """HF state-dict names of layer ``layer``'s tensors, by role."""
    p = f"model.layers.{layer}."
    return {"input_norm": p + "input_layernorm.weight", "q": p + "self_attn.q_proj.weight",
            "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight", "mlp_norm": p + "post_attention_layernorm.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight"}


HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_OUTPUT = "lm_head.weight"


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], where: str) -> None:
    """Raise ConversionError naming ``name`` when its shape is not ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(f"Tensor '{name}' in {where} has shape {tuple(tensor.shape)}, "
                              f"expected {tuple(expected)} for this architecture. The weights do "
                              f"not match the config (wrong config.json, or a different model).")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """HF q/k/v projections -> megatron-core fused QKV (rows grouped per key/value group)."""
    d, g, hpg = shape.head_dim, shape.num_query_groups, shape.heads_per_group
    cols = q.shape[-1]
    grouped = torch.cat([q.reshape(g, hpg * d, cols), k.reshape(g, d, cols),
                         v.reshape(g, d, cols)], dim=1)
    return grouped.reshape(-1, cols)


def split_qkv(qkv: torch.Tensor, shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """megatron-core fused QKV -> HF (q, k, v), each contiguous."""
    d, g, hpg = shape.head_dim, shape.num_query_groups, shape.heads_per_group
    cols = qkv.shape[-1]
    q, k, v = qkv.reshape(g, (hpg + 2) * d, cols).split([hpg * d, d, d], dim=1)
    return (q.reshape(-1, cols).contiguous(), k.reshape(-1, cols).contiguous(),
            v.reshape(-1, cols).contiguous())


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to ``padded_rows`` (the padded rows are never a real token)."""
    extra = padded_rows - weight.shape[0]
    if extra < 0:
        raise ConversionError(f"Cannot pad a vocabulary of {weight.shape[0]} rows down to "
                              f"{padded_rows}.")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])])


def layer_to_hf(tensors: dict[str, torch.Tensor], layer: int, shape: LlamaShape,
                where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """One layer's megatron-core tensors (keys ``LAYER_KEYS``, no layer axis) -> HF tensors."""
    for key, expected in shape.mcore_layer_shapes().items():
        if key not in tensors:
            raise ConversionError(f"Tensor '{key}' (layer {layer}) is missing from {where}.")
        check_shape(f"{key} [layer {layer}]", tensors[key], expected, where)
    names = hf_layer_names(layer)
    q, k, v = split_qkv(tensors[QKV], shape)
    gate, up = tensors[FC1].chunk(2, dim=0)
    return {names["input_norm"]: tensors[INPUT_NORM], names["q"]: q, names["k"]: k,
            names["v"]: v, names["o"]: tensors[PROJ], names["mlp_norm"]: tensors[MLP_NORM],
            names["gate"]: gate.contiguous(), names["up"]: up.contiguous(),
            names["down"]: tensors[FC2]}


def layer_from_hf(tensors: dict[str, torch.Tensor], layer: int, shape: LlamaShape,
                  where: str = "the Hugging Face weights") -> dict[str, torch.Tensor]:
    """One layer's HF tensors -> megatron-core tensors (keys ``LAYER_KEYS``, no layer axis)."""
    for name, expected in shape.hf_layer_shapes(layer).items():
        if name not in tensors:
            raise ConversionError(f"Tensor '{name}' is missing from {where}.")
        check_shape(name, tensors[name], expected, where)
    n = hf_layer_names(layer)
    return {INPUT_NORM: tensors[n["input_norm"]],
            QKV: fuse_qkv(tensors[n["q"]], tensors[n["k"]], tensors[n["v"]], shape),
            PROJ: tensors[n["o"]], MLP_NORM: tensors[n["mlp_norm"]],
            FC1: torch.cat([tensors[n["gate"]], tensors[n["up"]]]), FC2: tensors[n["down"]]}


def vocab_to_hf(name: str, weight: torch.Tensor, shape: LlamaShape,
                where: str = "the checkpoint") -> torch.Tensor:
    """Embedding or output layer -> HF: drop the padded rows."""
    if (weight.dim() != 2 or weight.shape[1] != shape.hidden_size
            or weight.shape[0] < shape.vocab_size):
        raise ConversionError(f"Tensor '{name}' in {where} has shape {tuple(weight.shape)}, "
                              f"expected (>= {shape.vocab_size}, {shape.hidden_size}) (padded "
                              f"vocabulary x hidden size).")
    return weight[:shape.vocab_size]


def vocab_from_hf(name: str, weight: torch.Tensor, shape: LlamaShape, padded_rows: int,
                  where: str = "the Hugging Face weights") -> torch.Tensor:
    """HF embedding or lm_head -> megatron-core: pad rows up to ``padded_rows``."""
    check_shape(name, weight, (shape.vocab_size, shape.hidden_size), where)
    return pad_vocab(weight, padded_rows)


def hf_names(shape: LlamaShape) -> list[str]:
    """Every tensor name a HF Llama with untied embeddings holds, in file order."""
    names = [HF_EMBEDDING]
    for layer in range(shape.num_layers):
        names += list(hf_layer_names(layer).values())
    return names + [HF_FINAL_NORM, HF_OUTPUT]


def find_prefix(keys, required: tuple[str, ...] = (EMBEDDING, QKV)) -> Optional[str]:
    """The key prefix under which a checkpoint stores the model (usually empty)."""
    candidates = sorted({k[:-len(required[0])] for k in keys if k.endswith(required[0])}, key=len)
    for prefix in candidates:
        if all(prefix + r in keys for r in required[1:]):
            return prefix
    return None

"""megatron-core's local layer spec (no Transformer Engine) with norms that work under
sequence parallelism and, on GPUs, attention through torch's fused
``scaled_dot_product_attention``; used by every family when TE is absent."""

from __future__ import annotations

import math
from typing import Optional

import torch


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, usable under sequence parallelism.

    megatron-core's local spec wraps torch norms but refuses sequence parallelism, because nothing
    marks their weights for the TP all-reduce of gradients that SP needs. Marking them
    (``sequence_parallel``, as apex's and TE's norms do) is all ``finalize_model_grads`` asks.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        # In the model's dtype, as every other megatron-core weight: an fp32 weight under bf16
        # activations sends torch.rms_norm to its slow unfused path (seen on an H200).
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class SDPAttention(torch.nn.Module):
    """Core attention of megatron-core's local spec computed by
    ``torch.nn.functional.scaled_dot_product_attention``: causal, grouped-query, on flash or
    cuDNN kernels on GPUs. It keeps only the softmax statistics instead of megatron-core's
    unfused ``DotProductAttention``, which stores the full ``heads x s x s`` score matrix
    (out of memory at 8K tokens). Same constructor and ``forward`` as ``DotProductAttention``;
    a drop-in ``core_attention`` submodule."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs Transformer Engine's "
                             "attention (megatron-core's local attention has no CP).")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("SDPAttention implements full causal attention with a plain "
                             "softmax only.")
        self.config = config
        self.causal = attn_mask_type == AttnMaskType.causal
        tp = (pg_collection.tp.size() if pg_collection is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        # megatron-core's query-key layer scaling divides the scores by the layer number and its
        # softmax multiplies them back: the same softmax scale, so it is not repeated here.
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query`` [sq, b, heads, d], ``key``/``value`` [sk, b, groups, d] -> [sq, b, heads*d].
        ``attention_mask`` (True = masked out, megatron-core's convention) replaces the causal
        mask when given."""
        from megatron.core import tensor_parallel

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention "
                             "bias.")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.dropout if self.training else 0.0

        def attend():
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout,
                is_causal=self.causal and mask is None, scale=self.softmax_scale,
                enable_gqa=self.heads != self.groups)

        if dropout and not self.config.sequence_parallel:
            # Dropout masks differ across TP ranks (each holds other heads), as megatron-core's.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads * query.shape[-1])


def local_layer_spec(tconfig, vp_stage, fused_attention: bool = False):
    """megatron-core's local (no Transformer Engine) layer spec with SP-capable RMSNorms, and
    :class:`SDPAttention` as core attention when ``fused_attention``."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    if fused_attention:
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tconfig, vp_stage=vp_stage),
        layer_norm=RMSNorm)

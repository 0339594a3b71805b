"""megatron-core's local layer spec (no Transformer Engine) with norms that work under
sequence parallelism; used by every family when TE is absent."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, usable under sequence parallelism.

    megatron-core's local spec wraps torch norms but refuses sequence parallelism, because nothing
    marks their weights for the TP all-reduce of gradients that SP needs. Marking them
    (``sequence_parallel``, as apex's and TE's norms do) is all ``finalize_model_grads`` asks.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def local_layer_spec(tconfig, vp_stage):
    """megatron-core's local (no Transformer Engine) layer spec with SP-capable RMSNorms."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tconfig, vp_stage=vp_stage),
        layer_norm=RMSNorm)

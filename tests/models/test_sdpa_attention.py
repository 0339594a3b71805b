"""flagscale's SDPA core attention (the fast path without Transformer Engine) computes what
megatron-core's own DotProductAttention computes: causal, grouped-query, forward and backward."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (6, 1)])
def test_sdpa_matches_megatron_dot_product_attention(heads, groups):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from flagscale.models.layers import SDPAttention
    from flagscale.platform import setup_platform, world_of_one

    setup_platform("cpu")
    seq, batch, dim = 12, 2, 8
    with world_of_one():
        parallel_state.initialize_model_parallel()
        # megatron-core's attention draws its (here zero-rate) dropout from the TP RNG tracker.
        model_parallel_cuda_manual_seed(1)
        try:
            config = TransformerConfig(num_layers=1, hidden_size=heads * dim,
                                       num_attention_heads=heads, num_query_groups=groups,
                                       kv_channels=dim, attention_dropout=0.0)
            ours = SDPAttention(config, 1, AttnMaskType.causal, "self")
            reference = DotProductAttention(config, 1, AttnMaskType.causal, "self")
            gen = torch.Generator().manual_seed(heads * 10 + groups)
            q = torch.randn(seq, batch, heads, dim, generator=gen)
            k = torch.randn(seq, batch, groups, dim, generator=gen)
            v = torch.randn(seq, batch, groups, dim, generator=gen)
            grad = torch.randn(seq, batch, heads * dim, generator=gen)
            outputs, grads = [], []
            for module in (ours, reference):
                inputs = [t.clone().requires_grad_() for t in (q, k, v)]
                out = module(*inputs, attention_mask=None)
                out.backward(grad)
                outputs.append(out.detach())
                grads.append([t.grad for t in inputs])
        finally:
            parallel_state.destroy_model_parallel()
    assert outputs[0].shape == (seq, batch, heads * dim)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Causal: the first position attends only to itself, so its output is its value.
    first = v[0].repeat_interleave(heads // groups, dim=1).reshape(batch, heads * dim)
    torch.testing.assert_close(outputs[0][0], first)

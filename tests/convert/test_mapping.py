"""The HF <-> megatron-core tensor mapping: exact layouts and bitwise round trips."""

import pytest
import torch

from flagscale.convert import mapping as M
from flagscale.errors import ConversionError

GQA = M.LlamaShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=48, vocab_size=100)
MHA = M.LlamaShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=4,
                   ffn_hidden_size=48, vocab_size=100)


def _hf_layer(shape, layer=0):
    gen = torch.Generator().manual_seed(layer)
    return {name: torch.randn(s, generator=gen) for name, s in shape.hf_layer_shapes(layer).items()}


def test_fused_qkv_rows_are_grouped_per_kv_group():
    d = GQA.head_dim
    q = torch.arange(4 * d).float().unsqueeze(1)          # head h rows: h*d .. h*d+d-1
    k = 1000 + torch.arange(2 * d).float().unsqueeze(1)
    v = 2000 + torch.arange(2 * d).float().unsqueeze(1)
    qkv = M.fuse_qkv(q, k, v, GQA)[:, 0]
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1
    expected = torch.cat([q[:2 * d, 0], k[:d, 0], v[:d, 0], q[2 * d:, 0], k[d:, 0], v[d:, 0]])
    assert torch.equal(qkv, expected)


@pytest.mark.parametrize("shape", [GQA, MHA], ids=["gqa", "mha"])
def test_layer_round_trip_is_bitwise(shape):
    hf = _hf_layer(shape, layer=1)
    mcore = M.layer_from_hf(hf, 1, shape)
    assert mcore[M.FC1].shape == (2 * shape.ffn_hidden_size, shape.hidden_size)
    gate = hf["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(mcore[M.FC1][:shape.ffn_hidden_size], gate)
    back = M.layer_to_hf(mcore, 1, shape)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_vocab_padding_round_trip():
    emb = torch.randn(100, 32)
    padded = M.vocab_from_hf(M.HF_EMBEDDING, emb, GQA, 128)
    assert padded.shape == (128, 32) and torch.count_nonzero(padded[100:]) == 0
    assert torch.equal(M.vocab_to_hf(M.EMBEDDING, padded, GQA), emb)


def test_shape_mismatch_names_tensor_and_shapes():
    hf = _hf_layer(GQA)
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*"
                                              r"\(40, 32\).*expected \(48, 32\)"):
        M.layer_from_hf(hf, 0, GQA)


def test_missing_tensor_is_named():
    hf = _hf_layer(GQA)
    del hf["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConversionError, match="k_proj"):
        M.layer_from_hf(hf, 0, GQA)

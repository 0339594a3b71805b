"""The HF <-> megatron-core tensor mapping: exact layouts and bitwise round trips."""

import pytest
import torch

from flagscale.config import ModelConfig
from flagscale.convert import mapping as M
from flagscale.errors import ConversionError
from flagscale.models import ModelDims, get_model_spec
from flagscale.models.llama import QKV_BIAS

SIZES = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
             vocab_size=100)
GQA = ModelConfig(num_query_groups=2, **SIZES)
MHA = ModelConfig(num_query_groups=4, **SIZES)
QWEN2 = ModelConfig(family="qwen2", num_query_groups=2, qkv_bias=True, tie_word_embeddings=True,
                    **SIZES)
FC1 = "decoder.layers.mlp.linear_fc1.weight"


def _hf_layer(wm, layer=0):
    gen = torch.Generator().manual_seed(layer)
    return {name: torch.randn(shape, generator=gen) for e in wm.layer
            for name, shape in zip(e.hf_names(layer), e.hf_shapes(wm.dims))}


def test_fused_qkv_rows_are_grouped_per_kv_group():
    dims = ModelDims.of(GQA)
    d = dims.head_dim
    q = torch.arange(4 * d).float().unsqueeze(1)          # head h rows: h*d .. h*d+d-1
    k = 1000 + torch.arange(2 * d).float().unsqueeze(1)
    v = 2000 + torch.arange(2 * d).float().unsqueeze(1)
    qkv = M.WeightMap.of(GQA).entry(M.QKV).from_hf((q, k, v), dims)[:, 0]
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1
    expected = torch.cat([q[:2 * d, 0], k[:d, 0], v[:d, 0], q[2 * d:, 0], k[d:, 0], v[d:, 0]])
    assert torch.equal(qkv, expected)
    # A bias is the same grouping without the column axis.
    bias = QKV_BIAS.from_hf((q[:, 0], k[:, 0], v[:, 0]), dims)
    assert torch.equal(bias, expected)


@pytest.mark.parametrize("model", [GQA, MHA, QWEN2], ids=["gqa", "mha", "qwen2"])
def test_layer_round_trip_is_bitwise(model):
    wm = M.WeightMap.of(model)
    hf = _hf_layer(wm, layer=1)
    mcore = wm.layer_from_hf(hf, 1)
    assert mcore[FC1].shape == (2 * model.ffn_hidden_size, model.hidden_size)
    gate = hf["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(mcore[FC1][:model.ffn_hidden_size], gate)
    back = wm.layer_to_hf(mcore, 1)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_vocab_padding_round_trip():
    wm = M.WeightMap.of(GQA, padded_vocab_size=128)
    emb = torch.randn(100, 32)
    padded = wm.from_hf({"model.embed_tokens.weight": emb}, wm.head)[M.EMBEDDING]
    assert padded.shape == (128, 32) and torch.count_nonzero(padded[100:]) == 0
    assert torch.equal(dict(wm.to_hf({M.EMBEDDING: padded}, wm.head))[
        "model.embed_tokens.weight"], emb)


def test_file_order_and_names_follow_the_declared_list():
    llama = [name for name, _ in M.WeightMap.of(GQA).hf_file_order()]
    assert llama[0] == "model.embed_tokens.weight" and llama[-2:] == ["model.norm.weight",
                                                                      "lm_head.weight"]
    assert len(llama) == 2 + 9 * 2 + 1
    qwen2 = M.WeightMap.of(QWEN2).hf_file_order()
    names = [name for name, _ in qwen2]
    # Tied embeddings: no lm_head; q/k/v biases right after their weights.
    assert "lm_head.weight" not in names and names[-1] == "model.norm.weight"
    assert names[2:6] == ["model.layers.0.self_attn.q_proj.weight",
                          "model.layers.0.self_attn.k_proj.weight",
                          "model.layers.0.self_attn.v_proj.weight",
                          "model.layers.0.self_attn.q_proj.bias"]
    assert dict(qwen2)["model.layers.1.self_attn.k_proj.bias"] == (16,)
    assert get_model_spec(QWEN2).name == "qwen2"


def test_shape_mismatch_names_tensor_and_shapes():
    wm = M.WeightMap.of(GQA)
    hf = _hf_layer(wm)
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*"
                                              r"\(40, 32\).*expected \(48, 32\)"):
        wm.layer_from_hf(hf, 0)


def test_missing_tensor_is_named():
    wm = M.WeightMap.of(QWEN2)
    hf = _hf_layer(wm)
    del hf["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConversionError, match="k_proj"):
        wm.layer_from_hf(hf, 0)
    hf = _hf_layer(wm)
    del hf["model.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(ConversionError, match=r"v_proj\.bias"):
        wm.layer_from_hf(hf, 0)

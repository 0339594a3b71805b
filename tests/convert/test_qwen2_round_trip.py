"""HF -> megatron-core (TP=2, PP=2) -> HF on a random tiny Qwen2: q/k/v biases, grouped-query
attention and tied embeddings survive bitwise, and transformers gives the same logits."""

import json
from pathlib import Path

import pytest
import torch

from flagscale.convert import hf_to_mcore, mcore_to_hf
from flagscale.checkpoint.reader import CheckpointReader
from flagscale.convert.tokenizer import export_tokenizer
from tests.convert.test_round_trip import VOCAB, _load_safetensors

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory):
    """A random Qwen2 with GQA, tied embeddings and non-trivial biases and norms, saved to disk."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, bos_token_id=2, eos_token_id=3)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        # transformers starts biases at 0 and norms at 1; random values make a misplaced bias
        # or norm visible in the comparison.
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    model.save_pretrained(path)
    export_tokenizer(REPO / "flagscale" / "data" / "corpus" / "tokenizer.model", path)
    return path, model


def test_qwen2_round_trip_at_tp2_pp2_is_bitwise_with_equal_logits(hf_qwen2, tmp_path):
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM

    src_dir, src_model = hf_qwen2
    ckpt = hf_to_mcore(src_dir, tmp_path / "ckpt", tp=2, pp=2)
    reader = CheckpointReader(ckpt)
    assert reader.shape("decoder.layers.self_attention.linear_qkv.bias") == (4, 128)
    assert reader.shape("embedding.word_embeddings.weight") == (4352, 64)
    assert "output_layer.weight" not in reader.tensors  # tied: stored once, as the embedding
    saved = dist_checkpointing.load_common_state_dict(str(ckpt))["flagscale"]["config"]["model"]
    assert (saved["family"], saved["qkv_bias"], saved["tie_word_embeddings"]) == (
        "qwen2", True, True)
    assert (saved["rope_theta"], saved["norm_epsilon"]) == (1000000.0, 1e-6)

    result = mcore_to_hf(ckpt, tmp_path / "hf", dtype="fp32")
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
    source, exported = _load_safetensors(src_dir), _load_safetensors(tmp_path / "hf")
    assert "lm_head.weight" not in exported
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, src_model(ids).logits)

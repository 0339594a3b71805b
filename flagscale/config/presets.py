"""Named model architectures (REFERENCE section 5; the published model cards and ``config.json``).

All are dense RMSNorm / SwiGLU / rotate-half RoPE decoders of one family (``flagscale.models``).
Llama, Aquila2 and Mistral: RMSNorm eps 1e-5, no linear biases, untied embeddings. Qwen2: eps 1e-6,
biases on the query/key/value projections, RoPE base 1e6, tied embeddings at 0.5B and 1.5B.
``tiny`` is the CI/demo model: small enough to train on 2 CPU processes in about a minute, yet with
GQA, SwiGLU and RoPE so every code path of the large models runs; ``tiny_qwen2`` is the same size
with Qwen2's biases and tied embeddings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flagscale.config.schema import ModelConfig

MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=352, vocab_size=4096, max_position_embeddings=256,
                 rope_theta=10000.0),
    "aquila2_7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                       ffn_hidden_size=11008, vocab_size=100008, max_position_embeddings=4096,
                       rope_theta=10000.0),
    # Init std 0.0165 is the FlagScale v0.1 Aquila2-34B recipe.
    "aquila2_34b": dict(num_layers=60, hidden_size=6144, num_attention_heads=48, num_query_groups=8,
                        ffn_hidden_size=24576, vocab_size=100008, max_position_embeddings=4096,
                        rope_theta=10000.0, init_method_std=0.0165),
    "aquila2_70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                        ffn_hidden_size=28672, vocab_size=100008, max_position_embeddings=4096,
                        rope_theta=10000.0),
    "llama2_7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
                      ffn_hidden_size=11008, vocab_size=32000, max_position_embeddings=4096,
                      rope_theta=10000.0),
    "llama2_13b": dict(num_layers=40, hidden_size=5120, num_attention_heads=40, num_query_groups=40,
                       ffn_hidden_size=13824, vocab_size=32000, max_position_embeddings=4096,
                       rope_theta=10000.0),
    "llama2_70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                       ffn_hidden_size=28672, vocab_size=32000, max_position_embeddings=4096,
                       rope_theta=10000.0),
    "llama3_8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                      ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3_70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                       ffn_hidden_size=28672, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    # 131072 context through llama3 rope scaling (factor 8 over the original 8192).
    "llama3_1_8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, rope_scaling_factor=8.0),
    "llama3_1_70b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                         ffn_hidden_size=28672, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling_factor=8.0),
    "llama3_1_405b": dict(num_layers=126, hidden_size=16384, num_attention_heads=128,
                          num_query_groups=8, ffn_hidden_size=53248, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0,
                          rope_scaling_factor=8.0),
    # v0.1 attends in a 4096-token sliding window: plain causal attention at seq_length <= 4096.
    "mistral_7b": dict(family="mistral", num_layers=32, hidden_size=4096, num_attention_heads=32,
                       num_query_groups=8, ffn_hidden_size=14336, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0),
    # Qwen2 (Qwen/Qwen2-*/config.json). max_position_embeddings is the 32768-token context the
    # model cards give (the Hub files say 131072 for YaRN-extended use, which needs rope scaling
    # megatron-core's GPTModel does not implement).
    "qwen2_0_5b": dict(family="qwen2", num_layers=24, hidden_size=896, num_attention_heads=14,
                       num_query_groups=2, ffn_hidden_size=4864, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1000000.0, norm_epsilon=1e-6,
                       qkv_bias=True, tie_word_embeddings=True),
    "qwen2_1_5b": dict(family="qwen2", num_layers=28, hidden_size=1536, num_attention_heads=12,
                       num_query_groups=2, ffn_hidden_size=8960, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1000000.0, norm_epsilon=1e-6,
                       qkv_bias=True, tie_word_embeddings=True),
    "qwen2_7b": dict(family="qwen2", num_layers=28, hidden_size=3584, num_attention_heads=28,
                     num_query_groups=4, ffn_hidden_size=18944, vocab_size=152064,
                     max_position_embeddings=32768, rope_theta=1000000.0, norm_epsilon=1e-6,
                     qkv_bias=True),
    "tiny_qwen2": dict(family="qwen2", num_layers=4, hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=352, vocab_size=4096,
                       max_position_embeddings=256, rope_theta=1000000.0, norm_epsilon=1e-6,
                       qkv_bias=True, tie_word_embeddings=True),
}


# Llama-3.1's rope scaling stretches an 8192-token pretraining context (the original context
# length megatron-core's RotaryEmbedding assumes for rope_scaling) to 131072.
_ROPE_SCALING_ORIGINAL_CONTEXT = 8192


def default_seq_length(model: ModelConfig) -> int:
    """The context a preset was pretrained at: ``max_position_embeddings``, or the original
    8192-token context of long-context variants (Llama-3.1, rope scaling)."""
    if model.rope_scaling_factor:
        return min(model.max_position_embeddings, _ROPE_SCALING_ORIGINAL_CONTEXT)
    return model.max_position_embeddings

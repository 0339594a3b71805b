"""Llama 2, Llama 3 / 3.1 (llama3 rope scaling) and Aquila2, which is a Llama under its own
Hugging Face class name (``AquilaForCausalLM``, REFERENCE section 4).

The weight mapping below is also Mistral's and Qwen2's: both keep Llama's module names.
"""

from __future__ import annotations

from flagscale.config import ModelConfig
from flagscale.models.hf_mapping import QKV, Direct, GatedMLP, Vocab
from flagscale.models.spec import ModelSpec, register

HIDDEN = ("hidden_size",)
_L = "model.layers.{layer}."
_ATTN = "decoder.layers.self_attention."
_MLP = "decoder.layers.mlp."
# megatron-core global keys use Transformer Engine's names; the local spec maps its layer-norm
# keys onto these through ``sharded_state_dict_keys_map``.
EMBEDDING = Vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight")
ATTENTION = [
    Direct(_ATTN + "linear_qkv.layer_norm_weight", _L + "input_layernorm.weight", HIDDEN),
    QKV(_ATTN + "linear_qkv.weight", _L + "self_attn.q_proj.weight",
        _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
]
QKV_BIAS = QKV(_ATTN + "linear_qkv.bias", _L + "self_attn.q_proj.bias",
               _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias")
OUT_AND_MLP = [
    Direct(_ATTN + "linear_proj.weight", _L + "self_attn.o_proj.weight",
           ("hidden_size", "q_width")),
    Direct(_MLP + "linear_fc1.layer_norm_weight", _L + "post_attention_layernorm.weight", HIDDEN),
    GatedMLP(_MLP + "linear_fc1.weight", _L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
    Direct(_MLP + "linear_fc2.weight", _L + "mlp.down_proj.weight",
           ("hidden_size", "ffn_hidden_size")),
]
FINAL_NORM = Direct("decoder.final_layernorm.weight", "model.norm.weight", HIDDEN)
OUTPUT = Vocab("output_layer.weight", "lm_head.weight")


class LlamaSpec(ModelSpec):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM", "AquilaForCausalLM")
    hf_model_types = ("llama", "aquila")

    def hf_mapping(self, model: ModelConfig) -> list:
        return [EMBEDDING, *ATTENTION, *([QKV_BIAS] if model.qkv_bias else []), *OUT_AND_MLP,
                FINAL_NORM, *([] if model.tie_word_embeddings else [OUTPUT])]

    def hf_config_extra(self, model: ModelConfig) -> dict:
        return {"attention_bias": False, "mlp_bias": False}


SPEC = register(LlamaSpec())

"""Reading and writing Hugging Face Llama configs; what megatron-core cannot run is refused."""

import json

import pytest

from flagscale.config import ModelConfig
from flagscale.convert.hf_config import hf_config_dict, model_fields_from_hf
from flagscale.errors import ConversionError

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}


def test_reads_old_top_level_rope_layout():
    fields = model_fields_from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA31_SCALING})
    assert (fields["rope_theta"], fields["rope_scaling_factor"]) == (500000.0, 8.0)
    assert fields["num_query_groups"] == 2 and fields["ffn_hidden_size"] == 96


def test_reads_transformers5_rope_parameters():
    fields = model_fields_from_hf({**BASE, "rope_parameters": {**LLAMA31_SCALING,
                                                               "rope_theta": 500000.0}})
    assert (fields["rope_theta"], fields["rope_scaling_factor"]) == (500000.0, 8.0)
    plain = model_fields_from_hf({**BASE, "rope_parameters": {"rope_type": "default",
                                                              "rope_theta": 10000.0}})
    assert (plain["rope_theta"], plain["rope_scaling_factor"]) == (10000.0, None)


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {**LLAMA31_SCALING, "low_freq_factor": 2.0}}, "low_freq_factor=2.0"),
    ({"rope_scaling": {**LLAMA31_SCALING, "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings=4096"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
])
def test_refuses_what_megatron_core_cannot_express(change, named):
    with pytest.raises(ConversionError, match=named.replace("(", r"\(")):
        model_fields_from_hf({**BASE, **change})


def test_missing_key_is_named():
    config = dict(BASE)
    del config["intermediate_size"]
    with pytest.raises(ConversionError, match="missing key.*intermediate_size"):
        model_fields_from_hf(config)


def test_written_config_loads_in_transformers_with_the_same_rope(tmp_path):
    from transformers import AutoConfig

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=96, vocab_size=300, max_position_embeddings=131072,
                        rope_theta=500000.0, rope_scaling_factor=8.0)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model, "bfloat16", 2, 3, 0)))
    loaded = AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(loaded).__name__ == "LlamaConfig"
    assert loaded.rope_parameters["rope_type"] == "llama3"
    assert loaded.rope_parameters["factor"] == 8.0
    assert loaded.rope_parameters["rope_theta"] == 500000.0
    assert (loaded.eos_token_id, loaded.num_key_value_heads) == (3, 2)
    assert model_fields_from_hf(json.loads((tmp_path / "config.json").read_text()))[
        "rope_scaling_factor"] == 8.0

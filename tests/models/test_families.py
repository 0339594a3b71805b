"""Model families: what each accepts and refuses, its Hugging Face config, and its parameter
counts with transformers as the judge."""

import json

import pytest
import torch

from flagscale.config import ModelConfig, load_config
from flagscale.convert.hf_config import hf_config_dict, model_fields_from_hf
from flagscale.errors import ConfigError, ConversionError
from flagscale.metrics import count_params, preset_model
from flagscale.models import architecture_keys, check_model, families, get_model_spec

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 512,
         "use_sliding_window": False, "sliding_window": 512}
MISTRAL = {**{k: v for k, v in QWEN2.items() if k not in ("use_sliding_window", "rope_theta")},
           "architectures": ["MistralForCausalLM"], "model_type": "mistral",
           "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def test_registered_families():
    assert families() == ["llama", "mistral", "qwen2"]
    with pytest.raises(ConfigError, match="model.family='gpt2'.*Known: llama, mistral, qwen2"):
        get_model_spec(ModelConfig(family="gpt2"))


@pytest.mark.parametrize("fields, named", [
    ({"qkv_bias": True}, r"model.qkv_bias=True does not fit model.family=llama"),
    ({"tie_word_embeddings": True}, r"model.tie_word_embeddings=true .* model.family=llama"),
    ({"family": "qwen2"}, r"model.qkv_bias=False does not fit model.family=qwen2"),
    ({"family": "mistral", "qkv_bias": True}, r"model.family=mistral"),
])
def test_check_model_refuses_what_the_family_cannot_express(fields, named):
    with pytest.raises(ConfigError, match=named):
        check_model(ModelConfig(**fields))


def test_presets_pass_their_family_check():
    for preset in ("tiny", "llama3_8b", "mistral_7b", "qwen2_0_5b", "qwen2_7b", "tiny_qwen2"):
        check_model(load_config(None, [f"model.preset={preset}"]).model)


def test_checkpoint_architecture_keys_include_the_family_options():
    keys = architecture_keys(ModelConfig())
    assert {"family", "qkv_bias", "tie_word_embeddings", "num_layers", "vocab_size"} <= set(keys)


def test_qwen2_config_reads_biases_tied_embeddings_and_rope():
    fields = model_fields_from_hf(QWEN2)
    assert (fields["family"], fields["qkv_bias"], fields["tie_word_embeddings"]) == (
        "qwen2", True, True)
    assert (fields["rope_theta"], fields["norm_epsilon"]) == (1000000.0, 1e-6)
    check_model(ModelConfig(**fields))


def test_mistral_sliding_window_is_refused_naming_the_key():
    with pytest.raises(ConversionError, match=r"sliding_window=64 is smaller than "
                                              r"max_position_embeddings=512"):
        model_fields_from_hf({**MISTRAL, "sliding_window": 64})
    # A window as long as the context is full causal attention: accepted.
    assert model_fields_from_hf(MISTRAL)["family"] == "mistral"
    assert model_fields_from_hf({**MISTRAL, "sliding_window": None})["family"] == "mistral"


def test_qwen2_sliding_window_is_refused_only_when_used():
    with pytest.raises(ConversionError, match="sliding_window=64"):
        model_fields_from_hf({**QWEN2, "use_sliding_window": True, "sliding_window": 64})
    assert model_fields_from_hf({**QWEN2, "sliding_window": 64})["family"] == "qwen2"


def test_aquila_reads_as_llama():
    config = {**MISTRAL, "architectures": ["AquilaForCausalLM"], "model_type": "aquila"}
    del config["sliding_window"]
    assert model_fields_from_hf(config)["family"] == "llama"


@pytest.mark.parametrize("preset, cls", [("tiny_qwen2", "Qwen2Config"),
                                         ("mistral_7b", "MistralConfig")])
def test_written_config_loads_in_transformers_as_the_family(preset, cls, tmp_path):
    from transformers import AutoConfig

    model = preset_model(preset)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model, "float32", 1, 2, 0)))
    loaded = AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(loaded).__name__ == cls
    assert loaded.tie_word_embeddings == model.tie_word_embeddings
    assert getattr(loaded, "sliding_window", None) is None
    fields = model_fields_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert fields == {k: getattr(model, k) for k in fields}


@pytest.mark.parametrize("preset", ["qwen2_0_5b", "qwen2_7b", "tiny_qwen2", "mistral_7b"])
def test_parameter_counts_match_transformers(preset, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = preset_model(preset)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model, "float32", 1, 2, 0)))
    config = AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert count_params(model).total == sum(p.numel() for p in hf.parameters())


def test_qwen2_published_sizes():
    assert count_params(preset_model("qwen2_0_5b")).total == 494_032_768      # "0.49B"
    assert count_params(preset_model("qwen2_7b")).total == 7_615_616_512      # "7.62B"
    tied = count_params(preset_model("qwen2_0_5b"))
    assert tied.output == 0 and tied.non_embedding == tied.total - 151936 * 896


def test_memory_plan_holds_a_tied_matrix_once_on_a_single_stage():
    from flagscale.metrics import padded_vocab
    from flagscale.plan import estimate_memory

    cfg = load_config(None, ["model.preset=qwen2_0_5b", "model.params_dtype=bf16",
                             "train.seq_length=4096"])
    counts = count_params(cfg.model, vocab_size=padded_vocab(cfg.model))
    assert counts.output == 0
    est = estimate_memory(cfg, tp=1, pp=1, dp=1, sequence_parallel=False)
    assert est.params == 2 * counts.total

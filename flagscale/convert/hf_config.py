"""Hugging Face ``config.json`` <-> flagscale ``ModelConfig`` for the Llama family.

Reads both rope layouts: top-level ``rope_theta`` + ``rope_scaling`` (transformers < 5) and
``rope_parameters`` with ``rope_theta`` inside (transformers 5.x); writes the one the installed
transformers expects (``rope_parameters`` when transformers is absent). Anything megatron-core
0.16.1's GPTModel cannot express is refused by name: it exposes only the llama3 scaling factor and
fixes low/high frequency factors 1 and 4 and original context 8192 inside ``_apply_scaling``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from flagscale.errors import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
# Aquila2 checkpoints on the Hub name their own class but are Llama (REFERENCE section 4).
ACCEPTED_ARCHITECTURES = (ARCHITECTURE, "AquilaForCausalLM")
ACCEPTED_MODEL_TYPES = ("llama", "aquila")
# What megatron-core 0.16.1 RotaryEmbedding._apply_scaling hard-codes.
MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "vocab_size")


def _transformers_major() -> Optional[int]:
    try:
        import transformers
    except ImportError:
        return None
    return int(transformers.__version__.split(".")[0])


def load_config_json(hf_dir: Path) -> dict:
    """``hf_dir/config.json`` as a dict (ConversionError when missing or unreadable)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: {hf_dir} is not a Hugging Face model "
                              f"directory (save one with model.save_pretrained).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object.")
    return config


def _rope(config: dict, where: str) -> tuple[float, Optional[float]]:
    """(rope_theta, llama3 scaling factor or None) from either rope layout."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        theta, scaling = params.get("rope_theta", config.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling")
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"{where}: rope type '{rope_type}' is not supported; megatron-core "
                              f"0.16.1's GPTModel implements only plain RoPE and 'llama3' scaling.")
    for key, fixed in MCORE_LLAMA3_FIXED.items():
        value = scaling.get(key, fixed)
        if float(value) != fixed:
            raise ConversionError(f"{where}: rope scaling {key}={value} cannot be expressed: "
                                  f"megatron-core 0.16.1 fixes it at {fixed:g} (only 'factor' is "
                                  f"configurable).")
    if "factor" not in scaling:
        raise ConversionError(f"{where}: llama3 rope scaling has no 'factor'.")
    return float(theta), float(scaling["factor"])


def model_fields_from_hf(config: dict, where: str = "config.json") -> dict[str, Any]:
    """flagscale ``ModelConfig`` fields of a HF Llama-family config; refuses, by name, what
    megatron-core cannot run."""
    archs = config.get("architectures") or [ARCHITECTURE]
    if not any(a in ACCEPTED_ARCHITECTURES for a in archs) or \
            config.get("model_type", "llama") not in ACCEPTED_MODEL_TYPES:
        raise ConversionError(f"{where}: architecture {archs} (model_type "
                              f"'{config.get('model_type')}') is not supported; flagscale converts "
                              f"the Llama family ({', '.join(ACCEPTED_ARCHITECTURES)}).")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConversionError(f"{where}: missing key(s) {', '.join(missing)}; a Llama config "
                              f"needs {', '.join(REQUIRED_KEYS)}.")
    refusals = [("attention_bias", False, "attention projections with bias"),
                ("mlp_bias", False, "MLP projections with bias"),
                ("tie_word_embeddings", False, "tied input/output embeddings"),
                ("hidden_act", "silu", "an activation other than silu (SwiGLU)")]
    for key, supported, what in refusals:
        if key in config and config[key] != supported:
            raise ConversionError(f"{where}: {key}={config[key]!r} ({what}) is not supported; "
                                  f"flagscale's megatron-core model needs {key}={supported!r}.")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ConversionError(f"{where}: head_dim={head_dim} * num_attention_heads={heads} != "
                              f"hidden_size={hidden}; flagscale derives the head size as "
                              f"hidden_size / num_attention_heads.")
    theta, factor = _rope(config, where)
    return dict(num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
                num_attention_heads=heads,
                num_query_groups=int(config.get("num_key_value_heads") or heads),
                ffn_hidden_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                rope_theta=theta, rope_scaling_factor=factor,
                norm_epsilon=float(config.get("rms_norm_eps", 1e-5)),
                init_method_std=float(config.get("initializer_range", 0.02)))


def hf_config_dict(model, dtype: str, bos: Optional[int], eos: Optional[int],
                   pad: Optional[int]) -> dict:
    """``config.json`` for a flagscale ``ModelConfig``, in the installed transformers' layout."""
    major = _transformers_major()
    config = {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.hidden_size // model.num_attention_heads,
        "vocab_size": model.vocab_size, "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "hidden_act": "silu",
        "initializer_range": model.init_method_std, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        ("dtype" if major is None or major >= 5 else "torch_dtype"): dtype,
    }
    scaling = None
    if model.rope_scaling_factor is not None:
        scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor),
                   **MCORE_LLAMA3_FIXED}
    if major is None or major >= 5:
        config["rope_parameters"] = {"rope_type": "default", **(scaling or {}),
                                     "rope_theta": float(model.rope_theta)}
    else:
        config["rope_theta"] = float(model.rope_theta)
        config["rope_scaling"] = scaling
    if major is not None:
        import transformers
        config["transformers_version"] = transformers.__version__
    return config


def generation_config_dict(bos: Optional[int], eos: Optional[int], pad: Optional[int]) -> dict:
    """``generation_config.json``: the special ids generation needs to stop and pad."""
    config = {"bos_token_id": bos, "eos_token_id": eos}
    if pad is not None:
        config["pad_token_id"] = pad
    return config

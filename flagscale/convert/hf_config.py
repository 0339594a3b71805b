"""Hugging Face ``config.json`` <-> flagscale ``ModelConfig``, through the model family's spec.

The family is found from ``architectures`` (``LlamaForCausalLM``, ``AquilaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``); its spec (``flagscale.models``) translates the fields
and refuses, by key, what megatron-core cannot run. Both rope layouts are read: top-level
``rope_theta`` + ``rope_scaling`` (transformers < 5) and ``rope_parameters`` (transformers 5.x);
exports are written in the layout the installed transformers expects (``rope_parameters`` when
transformers is absent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from flagscale.config import ModelConfig
from flagscale.errors import ConversionError
from flagscale.models import get_model_spec, spec_for_hf_config


def _transformers_version() -> Optional[str]:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


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


def model_fields_from_hf(config: dict, where: str = "config.json") -> dict[str, Any]:
    """flagscale ``ModelConfig`` fields of a HF config of a supported family; refuses, by name,
    what megatron-core cannot run."""
    return spec_for_hf_config(config, where).from_hf_config(config, where)


def hf_config_dict(model: ModelConfig, dtype: str, bos: Optional[int], eos: Optional[int],
                   pad: Optional[int]) -> dict:
    """``config.json`` for a flagscale ``ModelConfig``, in the installed transformers' layout."""
    return get_model_spec(model).to_hf_config(model, dtype, bos, eos, pad,
                                              _transformers_version())


def generation_config_dict(bos: Optional[int], eos: Optional[int], pad: Optional[int]) -> dict:
    """``generation_config.json``: the special ids generation needs to stop and pad."""
    config = {"bos_token_id": bos, "eos_token_id": eos}
    if pad is not None:
        config["pad_token_id"] = pad
    return config

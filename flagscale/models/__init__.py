"""megatron-core model construction for Llama-family configs."""

from flagscale.models.gpt import build_model, init_weights, layer_spec, transformer_config

__all__ = ["build_model", "transformer_config", "layer_spec", "init_weights"]

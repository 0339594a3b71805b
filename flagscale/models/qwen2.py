"""Qwen2 (``Qwen2ForCausalLM``): a Llama with biases on the query, key and value projections, RoPE
base 1e6, RMSNorm eps 1e-6, and the embedding shared with the output layer at 0.5B and 1.5B.

Its Hugging Face weights keep Llama's names plus ``q_proj/k_proj/v_proj.bias``; a tied model's
files hold no ``lm_head.weight``. Sliding-window attention (``use_sliding_window``) is refused like
Mistral's window.
"""

from __future__ import annotations

from typing import Optional

from flagscale.config import ModelConfig
from flagscale.models.llama import LlamaSpec
from flagscale.models.spec import register


class Qwen2Spec(LlamaSpec):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)
    qkv_bias = True
    tied_embeddings = True

    def hf_sliding_window(self, config: dict) -> Optional[int]:
        return config.get("sliding_window") if config.get("use_sliding_window") else None

    def hf_config_extra(self, model: ModelConfig) -> dict:
        return {"use_sliding_window": False, "sliding_window": None,
                "max_window_layers": model.num_layers}


SPEC = register(Qwen2Spec())

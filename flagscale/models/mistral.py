"""Mistral (``MistralForCausalLM``): a Llama whose attention may look back only ``sliding_window``
tokens. megatron-core's local layer spec has no windowed attention, so a window shorter than the
model's context is refused (full causal attention equals a window only on sequences no longer
than it); the ``mistral_7b`` preset keeps v0.1's context at its 4096-token window for that reason.
"""

from __future__ import annotations

from flagscale.config import ModelConfig
from flagscale.models.llama import LlamaSpec
from flagscale.models.spec import register


class MistralSpec(LlamaSpec):
    name = "mistral"
    hf_architectures = ("MistralForCausalLM",)
    hf_model_types = ("mistral",)

    def hf_config_extra(self, model: ModelConfig) -> dict:
        return {"sliding_window": None}


SPEC = register(MistralSpec())

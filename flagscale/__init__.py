"""flagscale: pretraining dense Llama-family LLMs on megatron-core."""

__version__ = "0.1.0"

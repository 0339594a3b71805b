"""Hugging Face <-> megatron-core conversion for every model family in ``flagscale.models``
(Llama 2/3/3.1, Aquila2, Mistral, Qwen2).

    from flagscale.convert import mcore_to_hf, hf_to_mcore
    mcore_to_hf("runs/tiny/checkpoints", "hf/tiny", dtype="bf16")   # validated by default
    hf_to_mcore("hf/tiny", "ckpt/tiny", tp=2, pp=2)                  # model weights only
"""

from flagscale.convert.export import ExportResult, mcore_to_hf
from flagscale.convert.importer import hf_to_mcore

__all__ = ["mcore_to_hf", "hf_to_mcore", "ExportResult"]

"""Check an exported Hugging Face model against flagscale's own megatron-core model.

Both models run in fp32 on the same fixed prompt: transformers' model of the family (loaded from
the export by ``AutoModelForCausalLM``), and megatron-core's ``GPTModel`` (flagscale's
``build_model`` at TP=PP=1) loaded from the source checkpoint by megatron-core's own
``dist_checkpointing``, with its weights rounded to the export dtype. Any difference then comes
from the two implementations' arithmetic only, so a wrong mapping (QKV grouping, fc1 halves,
biases, tied embeddings, RoPE settings, vocab padding) shows as a large gap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flagscale.config import Config
from flagscale.convert.common import DTYPES, single_process_layout, single_process_megatron
from flagscale.errors import ConversionError

PROMPT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
          "数据 und Überschall, naïve café.")
# Max |logit difference| allowed per unit of logit scale (max |logit|), by export dtype. Weights
# are rounded identically on both sides, so these bound fp32 arithmetic differences (summation
# order, fused vs unfused RMSNorm/softmax) and are the same for every dtype.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-4, "fp16": 1e-4}


def prompt_ids(hf_dir: Path, vocab_size: int) -> torch.Tensor:
    """The fixed prompt tokenized by the exported tokenizer, shape [1, seq]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    if not ids or max(ids) >= vocab_size:
        raise ConversionError(f"The exported tokenizer encodes the validation prompt to ids up to "
                              f"{max(ids, default=-1)}, but the model has {vocab_size} tokens: "
                              f"tokenizer and checkpoint do not belong together.")
    return torch.tensor([ids])


@torch.no_grad()
def megatron_logits(ckpt: Path, cfg: Config, padded_vocab: int, ids: torch.Tensor,
                    dtype: str) -> torch.Tensor:
    """Logits of flagscale's megatron-core model loaded from ``ckpt`` (one process)."""
    from megatron.core import dist_checkpointing

    from flagscale.models import build_model

    one, layout = single_process_layout(cfg, padded_vocab)
    with single_process_megatron() as platform:
        model = build_model(one, layout, platform)[0]
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        model.load_state_dict(state["model"], strict=False)
        for param in model.parameters():
            param.copy_(param.to(DTYPES[dtype]).float())
        model.eval()
        ids = ids.to(platform.device)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        logits = model(ids, positions, attention_mask=None)
        return logits[..., :cfg.model.vocab_size].float().cpu()


@torch.no_grad()
def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the exported model loaded by transformers (offline, fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 local_files_only=True)
    model.eval()
    return model(ids).logits.float()


def compare_with_megatron(ckpt: Path, cfg: Config, padded_vocab: int, hf_dir: Path, dtype: str,
                          log=print) -> tuple[float, float]:
    """Max |logit difference| between the export and the source model, and the tolerance it
    passed; raises ConversionError beyond the tolerance."""
    try:
        import transformers  # noqa: F401  (validation needs it; say so before any work)
    except ImportError:
        raise ConversionError("Validation loads the export with transformers, which is not "
                              "installed. pip install transformers, or pass --skip-validation."
                              ) from None
    ids = prompt_ids(hf_dir, cfg.model.vocab_size)
    reference = megatron_logits(ckpt, cfg, padded_vocab, ids, dtype)
    exported = hf_logits(hf_dir, ids)
    if exported.shape != reference.shape:
        raise ConversionError(f"Validation: transformers gives logits of shape "
                              f"{tuple(exported.shape)}, megatron-core {tuple(reference.shape)}.")
    diff = (exported - reference).abs().max().item()
    tolerance = TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
    log(f"validation: {ids.shape[1]} prompt tokens, max |logit diff| {diff:.3g} "
        f"(tolerance {tolerance:.3g}), same argmax at "
        f"{(exported.argmax(-1) == reference.argmax(-1)).float().mean().item():.0%} of positions")
    if not diff <= tolerance:
        raise ConversionError(f"Validation failed: the exported model's logits differ from "
                              f"flagscale's megatron-core model by up to {diff:.4g} (tolerance "
                              f"{tolerance:.3g}) on the fixed prompt. The export is wrong; it was "
                              f"not written. Re-run with --debug and report it.")
    return diff, tolerance

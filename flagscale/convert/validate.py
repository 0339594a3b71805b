"""Check a conversion layer by layer: flagscale's megatron-core model against transformers' model
of the family, on the same inputs, one layer of each in memory at a time.

    report = compare_layerwise(ckpt, cfg, hf_dir, round_to="bf16")   # ConversionError on failure

Both sides run in fp32 on one token sequence (the fixed prompt through the model's tokenizer, or
fixed random ids when there is none). The megatron-core side is megatron-core's own transformer
layer (the family's layer spec, built once at TP=PP=1) loaded with each layer's tensors from the
torch_dist checkpoint; the transformers side is the family's decoder layer class
(``LlamaDecoderLayer``, ...) built on its own with that layer's tensors from the safetensors, with
the rotary embeddings of the family's rotary module. Each layer gets the same input on both sides
(the transformers output of the previous layer), so a difference belongs to that layer alone and
does not compound with depth: the embedding lookups, every decoder layer's output and the final
logits (computed in blocks of vocabulary rows) are compared, and the first one beyond the
tolerance is named. With ``round_to`` the checkpoint's weights are first rounded to the export
dtype, so the sides hold identical weights and any difference comes from a wrong mapping (QKV
grouping, fc1 halves, biases, a permuted rotary layout, tied embeddings, RoPE settings, vocabulary
padding) or from the two implementations' fp32 arithmetic only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from flagscale.config import Config
from flagscale.convert import mapping as M
from flagscale.convert.common import (DTYPES, layer_sharded_state, megatron_layer,
                                      single_process_megatron)
from flagscale.errors import ConversionError

PROMPT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
          "数据 und Überschall, naïve café.")
RANDOM_TOKENS = 48
"""Length of the fixed random sequence used when the model directory has no tokenizer."""
TOLERANCE = 1e3 * torch.finfo(torch.float32).eps
"""Max |difference| per unit of scale (max(1, max |reference|)). Both sides hold the same weights
and compute in fp32, so differences come from summation order: the rounding of a dot product over
K terms grows like sqrt(K) * eps, and sqrt(K) < 250 up to K = 53248 (Llama-3.1-405B's MLP width);
1e3 * eps (1.2e-4) leaves that room, while a wrong mapping moves outputs by O(1) of their scale."""


@dataclass
class Stage:
    """One compared point: ``embedding``, ``layer N`` or ``logits``."""

    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class ValidationReport:
    """Every compared point, in order."""

    tokens: int
    stages: list[Stage] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        """Largest |logit difference|."""
        return self.stages[-1].max_abs_diff

    @property
    def tolerance(self) -> float:
        return self.stages[-1].tolerance

    @property
    def max_relative(self) -> float:
        """Largest difference over its tolerance, among all points (< 1 passes)."""
        return max(s.max_abs_diff / s.tolerance for s in self.stages)


def validation_ids(hf_dir: Path, vocab_size: int) -> torch.Tensor:
    """The fixed prompt tokenized by ``hf_dir``'s tokenizer, shape [1, seq]; fixed random ids
    when the directory holds no tokenizer."""
    if not any((hf_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (1, RANDOM_TOKENS), generator=gen)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    if not ids or max(ids) >= vocab_size:
        raise ConversionError(f"The tokenizer in {hf_dir} encodes the validation prompt to ids up "
                              f"to {max(ids, default=-1)}, but the model has {vocab_size} tokens: "
                              f"tokenizer and checkpoint do not belong together.")
    return torch.tensor([ids])


class _HFModel:
    """The family's transformers modules, built one at a time from the safetensors."""

    def __init__(self, hf_dir: Path, cfg: Config):
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        from flagscale.convert.safetensors_stream import SafetensorsReader
        from flagscale.models import get_model_spec

        try:
            config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        except (ValueError, KeyError, OSError):
            # An architecture transformers does not ship (AquilaForCausalLM): the same network
            # under the family's exported class.
            spec = get_model_spec(cfg.model)
            data = spec.to_hf_config(cfg.model, "float32", None, None, None,
                                     transformers.__version__)
            config = AutoConfig.for_model(**data)
        config._attn_implementation = "eager"
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        module = sys.modules[model_class.__module__]
        family = model_class.__name__[:-len("ForCausalLM")]
        self.config = config
        self.layer_class = getattr(module, f"{family}DecoderLayer")
        self.norm_class = getattr(module, f"{family}RMSNorm")
        self.rotary = getattr(module, f"{family}RotaryEmbedding")(config=config)
        self.weights = SafetensorsReader(hf_dir)

    def layer(self, index: int, names: list[str]):
        prefix = f"model.layers.{index}."
        with torch.device("meta"):
            layer = self.layer_class(self.config, index)
        state = {name[len(prefix):]: self.weights.get(name).float() for name in names}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()


def _compare(name: str, ours: torch.Tensor, reference: torch.Tensor) -> Stage:
    if ours.shape != reference.shape:
        raise ConversionError(f"Validation: {name} has shape {tuple(ours.shape)} in flagscale's "
                              f"megatron-core model and {tuple(reference.shape)} in transformers'.")
    scale = max(1.0, reference.abs().max().item())
    return Stage(name, (ours - reference).abs().max().item(), TOLERANCE * scale)


@torch.no_grad()
def compare_layerwise(ckpt: Path, cfg: Config, hf_dir: Path, round_to: Optional[str] = None,
                      log=print, progress: Optional[bool] = None) -> ValidationReport:
    """Compare checkpoint ``ckpt`` (flagscale config ``cfg``) with Hugging Face directory
    ``hf_dir`` layer by layer (module docstring). ``round_to``: an export dtype name the
    checkpoint's weights are rounded to first. Raises ConversionError at the first point beyond
    the tolerance, naming it."""
    try:
        import transformers  # noqa: F401  (validation needs it; say so before any work)
    except ImportError:
        raise ConversionError("Validation runs transformers' model, which is not installed. pip "
                              "install transformers, or pass --skip-validation.") from None
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from tqdm import tqdm

    from flagscale.checkpoint.reader import CheckpointReader
    from flagscale.models import get_model_spec

    start = time.perf_counter()
    hf = _HFModel(hf_dir, cfg)
    reader = CheckpointReader(ckpt)
    prefix = M.find_prefix(reader.tensors.keys()) or ""
    wm = M.WeightMap.of(cfg.model, padded_vocab_size=reader.shape(prefix + M.EMBEDDING)[0])
    dims, vocab = wm.dims, cfg.model.vocab_size
    ids = validation_ids(hf_dir, vocab)
    seq = ids.shape[1]
    report = ValidationReport(tokens=seq)
    rounding = DTYPES[round_to] if round_to else None

    def ours(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.to(rounding) if rounding is not None else tensor).float()

    def check(stage: Stage) -> None:
        report.stages.append(stage)
        if not stage.ok:
            raise ConversionError(
                f"Validation failed at {stage.name}: flagscale's megatron-core model and "
                f"transformers' differ by up to {stage.max_abs_diff:.4g} there (tolerance "
                f"{stage.tolerance:.3g}) on the same input"
                + ("" if stage.name == "embedding" else
                   ", while every earlier point agreed") + ". The conversion of "
                f"{stage.name} is wrong; the output was not written. Re-run with --debug and "
                f"report it.")

    embed_name = wm.entry(M.EMBEDDING).hf_names()[0]
    rows = sorted(set(ids[0].tolist()))
    hf_rows = torch.stack([hf.weights.rows(embed_name, r, r + 1)[0] for r in rows]).float()
    mc_rows = torch.stack([reader.read({prefix + M.EMBEDDING: ((r, 0), (1, dims.hidden_size))})[
        prefix + M.EMBEDDING][0] for r in rows])
    where = {r: i for i, r in enumerate(rows)}
    pick = torch.tensor([where[r] for r in ids[0].tolist()])
    x = hf_rows[pick].unsqueeze(0)  # [1, seq, hidden]
    check(_compare("embedding", ours(mc_rows)[pick].unsqueeze(0), x))
    del hf_rows, mc_rows

    positions = torch.arange(seq).unsqueeze(0)
    cos_sin = hf.rotary(x, positions)
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    rope_kwargs = get_model_spec(cfg.model).gpt_model_kwargs(cfg)
    keys = [prefix + e.mcore for e in wm.layer]
    with single_process_megatron() as platform:
        layer = megatron_layer(cfg, dims.vocab_rows, "fp32", platform).eval()
        rotary = RotaryEmbedding(kv_channels=dims.head_dim, rotary_percent=1.0,
                                 rotary_base=rope_kwargs["rotary_base"],
                                 rope_scaling=rope_kwargs["rope_scaling"],
                                 rope_scaling_factor=rope_kwargs["rope_scaling_factor"])
        rotary_emb = rotary(seq).to(platform.device)
        bar = tqdm(total=dims.num_layers, desc="validate", unit="layer",
                   disable=None if progress is None else not progress, leave=False)
        for index in range(dims.num_layers):
            names = [n for e in wm.layer for n in e.hf_names(index)]
            hf_layer = hf.layer(index, names)
            out = hf_layer(x, attention_mask=mask, position_ids=positions,
                           position_embeddings=cos_sin)
            reference = out[0] if isinstance(out, tuple) else out
            del hf_layer
            _load_layer(layer, reader.read_layer(keys, index), prefix, index, dims.num_layers,
                        ours)
            got, _ = layer(x.transpose(0, 1).contiguous().to(platform.device),
                           attention_mask=None, rotary_pos_emb=rotary_emb)
            check(_compare(f"layer {index}", got.transpose(0, 1).float().cpu(), reference))
            x = reference
            bar.update(1)
        bar.close()
        del layer

    norm_entry = wm.entry("decoder.final_layernorm.weight")
    hf_norm = hf.norm_class(dims.hidden_size, eps=cfg.model.norm_epsilon)
    hf_norm.weight.copy_(hf.weights.get(norm_entry.hf_names()[0]).float())
    ref_h = hf_norm(x)[0]
    our_w = ours(reader.read_full(prefix + norm_entry.mcore))
    our_h = torch.nn.functional.rms_norm(x[0], (dims.hidden_size,), our_w,
                                         eps=cfg.model.norm_epsilon)
    out_key = M.EMBEDDING if cfg.model.tie_word_embeddings else "output_layer.weight"
    hf_out = wm.entry(out_key).hf_names()[0]
    # Vocabulary blocks of about one layer's size: the output layer is never whole in memory.
    layer_numel = sum(torch.Size(e.mcore_shape(dims)).numel() for e in wm.layer)
    block = max(1, layer_numel // dims.hidden_size)
    blocks = []
    for lo in range(0, vocab, block):
        hi = min(vocab, lo + block)
        ref = ref_h @ hf.weights.rows(hf_out, lo, hi).float().T
        got = our_h @ ours(reader.read({prefix + out_key: ((lo, 0), (hi - lo, dims.hidden_size))})[
            prefix + out_key]).T
        blocks.append((ref.abs().max().item(), (got - ref).abs().max().item()))
    scale = max([1.0] + [b[0] for b in blocks])
    check(Stage("logits", max(b[1] for b in blocks), TOLERANCE * scale))
    report.seconds = time.perf_counter() - start
    reader.close()
    hf.weights.close()
    log(f"validation: {seq} tokens, embedding + {dims.num_layers} layers + logits compared with "
        f"transformers, max |logit diff| {report.max_abs_diff:.3g} (tolerance "
        f"{report.tolerance:.3g}), worst point at {report.max_relative:.2g}x its tolerance, in "
        f"{report.seconds:.1f}s")
    return report


def _load_layer(layer, tensors: dict, prefix: str, index: int, num_layers: int, ours) -> None:
    """Copy one layer's checkpoint tensors (keyed by global key) into megatron-core's layer
    module, through the module's own sharded state (which names every parameter's global key)."""
    state = layer_sharded_state(layer, index, num_layers)
    filled = set()
    for item in state.values():
        data = getattr(item, "data", None)
        if not isinstance(data, torch.Tensor):
            continue  # _extra_state objects carry no weights
        key = prefix + item.key
        if key not in tensors:
            raise ConversionError(f"Validation: megatron-core's layer has tensor '{item.key}', "
                                  f"which the family's weight mapping does not read.")
        data.copy_(ours(tensors[key]))
        filled.add(key)
    unused = sorted(set(tensors) - filled)
    if unused:
        raise ConversionError(f"Validation: checkpoint tensor(s) {', '.join(unused)} have no "
                              f"place in megatron-core's layer.")

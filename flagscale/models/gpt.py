"""Build megatron-core ``GPTModel`` chunks for any registered family.

``build_model`` returns one model chunk per virtual pipeline stage held by this rank, configured by
the family's :class:`~flagscale.models.spec.ModelSpec`. Weights are initialised by
:func:`init_weights`, which draws every parameter from a generator seeded by the run seed and the
parameter's global name, on the global (unsharded) tensor, and keeps this rank's slice: the same
seed gives the same model at any TP/PP/VPP layout.

The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by * tp``, so the padding
changes with TP. The padding takes no part in training: its rows are initialised to zeros, and
:func:`mask_vocabulary_padding` removes its columns from the logits before the cross entropy, so
they get no gradient and the loss is the loss over the true vocabulary at every padding.
"""

from __future__ import annotations

import hashlib
import math

import torch

from flagscale.config import Config, Layout
from flagscale.models.spec import check_model, get_model_spec
from flagscale.platform import Platform

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""The parameters with one row per (padded) vocabulary entry."""


def build_model(cfg: Config, layout: Layout, platform: Platform) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), initialised, on the platform's device.

    ``megatron.core.parallel_state`` must already be initialised for ``layout``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    check_model(cfg.model)
    spec = get_model_spec(cfg.model)
    tconfig = spec.transformer_config(cfg, layout, platform)
    chunks = []
    for stage in range(layout.vpp or 1):
        vp_stage = stage if layout.vpp else None
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=spec.layer_spec(platform, tconfig, vp_stage),
            vocab_size=layout.padded_vocab_size,
            max_sequence_length=max(cfg.model.max_position_embeddings, cfg.train.seq_length),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            vp_stage=vp_stage,
            **spec.gpt_model_kwargs(cfg),
        )
        model.to(platform.device)
        init_weights(model, cfg, seed=cfg.train.seed)
        if model.post_process:
            mask_vocabulary_padding(model.output_layer, cfg.model.vocab_size)
        chunks.append(model)
    return chunks


def mask_vocabulary_padding(output_layer: torch.nn.Module, vocab_size: int) -> None:
    """Set the logits of the padding columns (ids >= ``vocab_size``) to the dtype's lowest value
    on the way out of ``output_layer`` (a ``ColumnParallelLinear``), on this TP rank's slice of
    the vocabulary or on the gathered logits alike.

    Softmax over those columns then gives exactly zero (exp underflows), so megatron-core's
    vocab-parallel cross entropy (native, fused or TE's) sums over the true vocabulary only, and
    ``masked_fill`` passes no gradient to them: the padding rows of the output layer get zero
    gradient. The lowest finite value rather than -inf: online-softmax kernels rescale by
    ``exp(max_old - max_new)``, which is NaN on a TP slice made of padding only. The fill is out
    of place; the unmasked logits are freed as soon as it returns (its backward needs only the
    mask)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    per_rank = output_layer.output_size_per_partition
    if per_rank * parallel_state.get_tensor_model_parallel_world_size() == vocab_size:
        return

    def mask(module, args, output):
        logits, bias = output
        width = logits.shape[-1]
        start = tp_rank * per_rank if width == per_rank else 0  # else gathered: whole vocabulary
        if start + width <= vocab_size:
            return None
        padding = torch.arange(start, start + width, device=logits.device) >= vocab_size
        return logits.masked_fill(padding, torch.finfo(logits.dtype).min), bias

    output_layer.register_forward_hook(mask)


def global_param_name(model: torch.nn.Module, name: str) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global 0-based>.x``: a layout-free name."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
    return ".".join(parts)


def _seeded_normal(shape, std: float, seed: int, key: str, device) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: Config, seed: int) -> None:
    """Layout-invariant init by the family's parameter roles: ones for norms, zeros for biases,
    normal(0, std) weights and std/sqrt(2L) for residual-branch outputs (Megatron's scaled init);
    each weight drawn whole, then sliced to this rank's shard."""
    from megatron.core import parallel_state

    spec = get_model_spec(cfg.model)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    std = cfg.model.init_method_std
    for name, param in model.named_parameters():
        role = spec.param_role(name)
        if role in ("norm", "bias"):
            param.fill_(1.0 if role == "norm" else 0.0)
            continue
        scale = std / math.sqrt(2.0 * cfg.model.num_layers) if role == "residual" else std
        key = spec.init_key(global_param_name(model, name), cfg.model)
        sharded = getattr(param, "tensor_model_parallel", False) and tp > 1
        shape = list(param.shape)
        if sharded:
            shape[param.partition_dim] *= tp
        if name in VOCAB_PARAMS:
            # The true vocabulary's rows only, padding rows zero: the same draw at any padding.
            vocab = cfg.model.vocab_size
            full = torch.zeros(shape, device=param.device)
            full[:vocab] = _seeded_normal([vocab, *shape[1:]], scale, seed, key, param.device)
        else:
            full = _seeded_normal(shape, scale, seed, key, param.device)
        if not sharded:
            param.copy_(full)
        elif name.endswith("linear_fc1.weight"):
            # Global fc1 is [gate; up]; a TP shard holds [gate_shard; up_shard].
            gate, up = full.chunk(2, dim=0)
            param.copy_(torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]]))
        else:
            param.copy_(full.chunk(tp, dim=param.partition_dim)[tp_rank])

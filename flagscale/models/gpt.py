"""Build megatron-core ``GPTModel`` chunks for a Llama-family config.

``transformer_config`` is the single translation from flagscale's config into megatron-core's
``TransformerConfig``; ``build_model`` returns one model chunk per virtual pipeline stage held by this
rank. Weights are initialised by :func:`init_weights`, which draws every parameter from a generator
seeded by the run seed and the parameter's global name, on the global (unsharded) tensor, and keeps
this rank's slice: the same seed gives the same model at any TP/PP/VPP layout.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from flagscale.config import Config, Layout
from flagscale.platform import Platform


def transformer_config(cfg: Config, layout: Layout, platform: Platform):
    """Translate the flagscale config into megatron-core's ``TransformerConfig``."""
    from megatron.core.transformer import TransformerConfig

    m, p, t = cfg.model, cfg.parallel, cfg.train
    bf16 = m.params_dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    fused = platform.kind == "cuda"
    recompute = {"none": {}, "selective": dict(recompute_granularity="selective"),
                 "full": dict(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)}[t.recompute]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=layout.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=layout.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # init_weights redraws every weight so it does not depend on the layout; megatron-core's
        # own pass stays on because it is also what marks parameters as tensor-parallel
        # (without those marks the grad norm ignores the shards of TP ranks > 0).
        perform_initialization=True,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # The loss is a token mean over the whole global batch, whatever the microbatch split.
        calculate_per_token_loss=True,
        bias_activation_fusion=fused,
        masked_softmax_fusion=False,
        persist_layer_norm=fused,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=fused and platform.apex,
        deallocate_pipeline_outputs=True,
        # gloo matches messages between two ranks by posting order only. Batched p2p posts a
        # forward activation and a backward gradient of equal shape to the same peer (pp=2:
        # previous == next stage) in an order the receiver does not mirror, silently swapping
        # them under the interleaved schedule; megatron's ordered even/odd p2p path does not.
        batch_p2p_comm=platform.kind == "cuda",
        **recompute,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, usable under sequence parallelism.

    megatron-core's local spec wraps torch norms but refuses sequence parallelism, because nothing
    marks their weights for the TP all-reduce of gradients that SP needs. Marking them
    (``sequence_parallel``, as apex's and TE's norms do) is all ``finalize_model_grads`` asks.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(platform: Platform, tconfig, vp_stage):
    """Transformer Engine spec when TE is importable, megatron-core's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    if platform.transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(tconfig, vp_stage=vp_stage),
        layer_norm=RMSNorm)


def build_model(cfg: Config, layout: Layout, platform: Platform) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), initialised, on the platform's device.

    ``megatron.core.parallel_state`` must already be initialised for ``layout``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tconfig = transformer_config(cfg, layout, platform)
    chunks = []
    for stage in range(layout.vpp or 1):
        vp_stage = stage if layout.vpp else None
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=layer_spec(platform, tconfig, vp_stage),
            vocab_size=layout.padded_vocab_size,
            max_sequence_length=max(cfg.model.max_position_embeddings, cfg.train.seq_length),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rope_theta),
            rope_scaling=cfg.model.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.model.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        )
        model.to(platform.device)
        init_weights(model, cfg, seed=cfg.train.seed)
        chunks.append(model)
    return chunks


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
    """Layout-invariant init: normal(0, std) weights, std/sqrt(2L) for residual-branch outputs
    (Megatron's scaled init), ones for norms; each drawn whole, then sliced to this rank's shard."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    std = cfg.model.init_method_std
    for name, param in model.named_parameters():
        if "layernorm" in name or "layer_norm" in name:
            param.fill_(1.0)
            continue
        scale = std / math.sqrt(2.0 * cfg.model.num_layers) if (
            name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight")) else std
        key = global_param_name(model, name)
        if not getattr(param, "tensor_model_parallel", False) or tp == 1:
            param.copy_(_seeded_normal(param.shape, scale, seed, key, param.device))
            continue
        dim = param.partition_dim
        shape = list(param.shape)
        shape[dim] *= tp
        full = _seeded_normal(shape, scale, seed, key, param.device)
        if name.endswith("linear_fc1.weight"):
            # Global fc1 is [gate; up]; a TP shard holds [gate_shard; up_shard].
            gate, up = full.chunk(2, dim=0)
            local = torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
        else:
            local = full.chunk(tp, dim=dim)[tp_rank]
        param.copy_(local)
